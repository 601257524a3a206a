"""Run the quantflow flow from the CLI and say where to see it.

With ``PREFECT_API_URL`` set the run goes to that server; otherwise Prefect starts a temporary
server on the SQLite database in ``PREFECT_HOME``, which ``quantflow serve`` later opens in
the UI. Either way the user is told the run's URL and its artifacts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    PREFECT_UI_URL,
    temporary_settings,
)

from flows.quantize import USER_ERROR, quantflow_run
from quantflow.errors import QuantflowError
from quantflow.spec import RunSpec

LOCAL_UI = "http://127.0.0.1:4200"


def ui_link(server: str, path: str) -> str:
    """A page of Prefect's UI on ``server`` (its address without /api). Prefect 3.9 opens the V2 UI only for its
    root; a deep link without /v2 lands in the V1 UI, whose run form draws each variant as a raw JSON editor. So
    links go to the V2 UI unless the user turned it off (PREFECT_SERVER_UI_V2_ENABLED=false)."""
    from prefect.settings import get_current_settings

    v2 = "/v2" if get_current_settings().server.ui.v2_enabled else ""
    return f"{server.rstrip('/')}{v2}/{path.lstrip('/')}"


STARTUP_WAIT_S = 180


def _no_user_error_traceback(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task or flow with its traceback; for bad input (a QuantflowError) the console shows the
    message only, once: the CLI prints the run log's ``error:`` line itself."""
    if record.exc_info and isinstance(record.exc_info[1], QuantflowError):
        record.exc_info, record.exc_text = None, None
    return not getattr(record, USER_ERROR, False)


def quiet_user_errors() -> None:
    """Keep tracebacks of user errors off the console (the run's logs on the server keep them)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and _no_user_error_traceback not in handler.filters:
            handler.addFilter(_no_user_error_traceback)


def _startup_wait() -> dict:
    """Prefect waits 20 s for its temporary server by default; a busy 2-core machine was seen to need longer (the wait
    is a bound, not a delay). Set through Prefect's settings context: Prefect reads the environment once, at import,
    so setting the variable here would not reach it. A user's own value wins."""
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return {}
    return {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: STARTUP_WAIT_S}


def run_flow(spec: RunSpec) -> tuple[Path, str]:
    """Run the flow; return the output folder and a few lines naming the run, its UI URL and artifacts."""
    # The temporary server inherits this environment. Its telemetry heartbeat cannot reach the internet
    # from an offline machine, and it raced the server's first writes on SQLite ("database is locked"
    # traceback in the demo's output), so it is off, as `quantflow serve` starts its server with --analytics-off.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    quiet_user_errors()
    with temporary_settings(updates=_startup_wait()):
        waited = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        try:
            state = quantflow_run(spec, return_state=True)
        except RuntimeError as error:
            if "ephemeral Prefect API" not in str(error):
                raise
            raise QuantflowError(
                f"the temporary Prefect server did not answer within {waited} s (a busy machine?)",
                "start a server once with `quantflow serve` (or point PREFECT_API_URL at one) and run again, raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or use --engine local",
            ) from None
    out = Path(state.result())  # re-raises the flow's error (a QuantflowError reaches the CLI intact)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    if PREFECT_API_URL.value():
        ui = ui_link(PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api"), f"runs/flow-run/{run_id}")
        where = f"Prefect flow run '{run.name}': {ui}"
    else:
        where = (
            f"Prefect flow run '{run.name}' is recorded in {PREFECT_HOME.value()}; `quantflow serve` shows it at "
            f"{ui_link(LOCAL_UI, f'runs/flow-run/{run_id}')}"
        )
    # Prefect stops its temporary server at exit, once the console has its terminal back: that INFO line is noise
    logging.getLogger("prefect").setLevel(logging.WARNING)
    keys = ", ".join(sorted(a.key for a in artifacts if a.key))
    return out, f"{where}\nPrefect artifacts: {keys}"
