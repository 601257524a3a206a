"""Prefect's files under ``QUANTFLOW_HOME`` when quantflow starts Prefect, unless the user chose a place.

Left to itself Prefect keeps its database, result storage (a failed run's exception, a served run's results),
logs and profiles in ``~/.prefect``: outside the one folder quantflow promises to write to. Prefect reads its
environment when it is imported and passes it on to the servers and flow-run processes it starts, so the
variables are set just before a command first imports Prefect (only then: a refused command writes nothing), and
everything started from this process inherits them.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantflow.infra.home import quantflow_home

USER_PROFILES = Path("~/.prefect/profiles.toml")


def prefect_home() -> Path:
    """``$PREFECT_HOME`` when the user set it, else ``$QUANTFLOW_HOME/prefect``."""
    chosen = os.environ.get("PREFECT_HOME")
    return Path(chosen).expanduser() if chosen else quantflow_home() / "prefect"


def use_quantflow_home() -> None:
    """Default ``PREFECT_HOME`` (and with it result storage, local storage blocks, logs, the database) under
    ``QUANTFLOW_HOME``. A user's own ``~/.prefect/profiles.toml`` stays in force (read, never written), so a server
    chosen with ``prefect config set PREFECT_API_URL=...`` is still the one runs go to."""
    if not os.environ.get("PREFECT_HOME"):
        home = prefect_home()
        home.mkdir(parents=True, exist_ok=True)  # Prefect creates its home without parents: a new QUANTFLOW_HOME
        os.environ["PREFECT_HOME"] = str(home)
        profiles = USER_PROFILES.expanduser()
        if profiles.is_file():
            os.environ.setdefault("PREFECT_PROFILES_PATH", str(profiles))
