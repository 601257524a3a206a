"""Run the quantflow flow from the CLI and say where to see it.

With ``PREFECT_API_URL`` set the run goes to that server; otherwise Prefect starts a temporary
server on the SQLite database in ``PREFECT_HOME``, which ``quantflow serve`` later opens in
the UI. Either way the user is told the run's URL and its artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

from flows.quantize import quantflow_run
from quantflow.spec import RunSpec

LOCAL_UI = "http://127.0.0.1:4200"


def run_flow(spec: RunSpec) -> tuple[Path, str]:
    """Run the flow; return the output folder and a few lines naming the run, its UI URL and artifacts."""
    # The temporary server inherits this environment. Its telemetry heartbeat cannot reach the internet
    # from an offline machine, and it raced the server's first writes on SQLite ("database is locked"
    # traceback in the demo's output), so it is off, as `quantflow serve` starts its server with --analytics-off.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    state = quantflow_run(spec, return_state=True)
    out = Path(state.result())  # re-raises the flow's error (a QuantflowError reaches the CLI intact)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    if PREFECT_API_URL.value():
        ui = f"{PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix('/api')}/runs/flow-run/{run_id}"
        where = f"Prefect flow run '{run.name}': {ui}"
    else:
        where = (f"Prefect flow run '{run.name}' is recorded in {PREFECT_HOME.value()}; "
                 f"`quantflow serve` shows it at {LOCAL_UI}/runs/flow-run/{run_id}")
    keys = ", ".join(sorted(a.key for a in artifacts if a.key))
    return out, f"{where}\nPrefect artifacts: {keys}"
