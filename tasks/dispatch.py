"""Fan-out: run one branch of the DAG as its own flow run on a (GPU) work pool.

Each dispatched run is a flow run of the ``quantflow-variant`` deployment, so any idle worker
of that pool can take it: with two GPU workers, two variants quantize at once. The parent
waits for its children and later reads their results from the shared content-addressed
cache, so nothing large crosses the API.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from quantflow.spec import RunSpec
from tasks.artifacts import short_model_name

POLL_SECONDS = 2


@task(name="dispatch", cache_policy=NO_CACHE, task_run_name="dispatch-{variant}")
def dispatch_task(deployment: str, spec: RunSpec, variant: str | None) -> str:
    """Start ``deployment`` for one variant (None: baseline + calibration only) and wait for it to finish."""
    parent = get_run_context().task_run.flow_run_id
    child = run_deployment(
        deployment,
        parameters={"spec": spec.model_dump(mode="json"), "variant": variant},
        poll_interval=POLL_SECONDS,
        idempotency_key=f"{parent}-{variant or 'baseline'}",
        flow_run_name=f"{short_model_name(spec.model.source)}: {variant or 'baseline'}",
    )
    if not child.state or not child.state.is_completed():
        raise RuntimeError(
            f"flow run {child.name} ({child.id}) for {variant or 'the baseline'} ended "
            f"{child.state.name if child.state else 'without a state'}"
        )
    get_run_logger().info("%s finished in flow run %s", variant or "baseline", child.name)
    return str(child.id)
