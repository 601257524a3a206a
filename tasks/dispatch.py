"""Fan-out: run one branch of the DAG as its own flow run on a (GPU) work pool.

Each dispatched run is a flow run of the ``quantflow-variant`` deployment, so any idle worker
of that pool can take it: with two GPU workers, two variants quantize at once. The parent
waits for its children and later reads their results from the shared content-addressed
cache, so nothing large crosses the API.
"""

from __future__ import annotations

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.logging import get_run_logger

from quantflow.spec import RunSpec, short_model_name

POLL_SECONDS = 5  # one read per child per interval: a 30-variant sweep polls 6 times a second


def api_hiccup(task, task_run, state) -> bool:
    """Retry a dispatch the API failed with a 5xx or a dropped connection; the idempotency key makes the retry find
    the child flow run the first attempt created instead of starting a second one."""
    try:
        state.result()
    except PrefectHTTPStatusError as error:
        return error.response.status_code >= 500
    except httpx.TransportError:
        return True
    except Exception:
        return False
    return False


@task(
    name="dispatch",
    cache_policy=NO_CACHE,
    task_run_name="dispatch {variant}",
    retries=3,
    retry_delay_seconds=[5, 20, 60],
    retry_condition_fn=api_hiccup,
)
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
