"""The one folder quantflow keeps its own files in: the step cache and Prefect's home when quantflow starts Prefect."""

from __future__ import annotations

import os
from pathlib import Path


def quantflow_home() -> Path:
    """``$QUANTFLOW_HOME``, else ``~/.cache/quantflow``: nothing quantflow writes besides a run's output lands outside
    it, so removing this folder resets quantflow and moving it (a bigger disk, a shared one) moves everything."""
    home = os.environ.get("QUANTFLOW_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "quantflow"
