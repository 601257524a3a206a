"""Prefect tasks for each pipeline stage.

Domain logic lives in ``quantflow.pipeline``/``quantflow.steps``; these wrappers add what
Prefect is for. Heavy stages carry the ``quantflow-accelerator`` tag: a global concurrency
limit on that tag (``prefect concurrency-limit create quantflow-accelerator 1``) keeps one
GPU from being oversubscribed. Caching is content-addressed inside ``quantflow.steps`` (keys
hash model content, variant config, calibration and library versions), so a re-run returns
from these tasks in seconds without Prefect result storage. Retries are only where a retry
can help (I/O); a bad config fails once, with its message. The tasks' own timeouts are a
backstop; the spec's ``step_timeout_s`` is what really stops a stuck step, by killing the
step's process (a thread timeout cannot interrupt a blocking CUDA call).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from quantflow import pipeline
from quantflow.calibration import CalibrationRecord
from quantflow.errors import QuantflowError
from quantflow.spec import RunSpec, Variant
from tasks.credentials import store_credentials

ACCELERATOR_TAG = "quantflow-accelerator"
HEAVY_TIMEOUT_S = 6 * 3600


def _no_retry_on_user_error(task, task_run, state) -> bool:
    """Retry I/O hiccups, never a QuantflowError (bad input stays bad)."""
    try:
        state.result()
    except QuantflowError:
        return False
    except Exception:
        return True
    return False


@task(name="plan", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_no_retry_on_user_error)
def plan_task(spec: RunSpec) -> pipeline.Plan:
    """Validate the spec against the model's shapes and this machine; download or convert the model."""
    with store_credentials(spec):  # an s3:// model source reads with the same credentials
        return pipeline.plan(spec, progress=get_run_logger().info)


@task(name="baseline-and-calibration", cache_policy=NO_CACHE, tags=[ACCELERATOR_TAG], timeout_seconds=HEAVY_TIMEOUT_S)
def baseline_task(plan: pipeline.Plan) -> pipeline.Stage:
    stage = pipeline.baseline_and_calibration(plan)
    get_run_logger().info("baseline perplexity %.4f, calibration %s (%s)", stage.baseline.perplexity, stage.calibration.hash,
                          "cached" if stage.cached else "computed")
    if stage.calibration.note:
        get_run_logger().warning(stage.calibration.note)
    return stage


@task(name="variant", cache_policy=NO_CACHE, tags=[ACCELERATOR_TAG], timeout_seconds=HEAVY_TIMEOUT_S, task_run_name="variant-{variant.name}")
def branch_task(plan: pipeline.Plan, variant: Variant, calibration: CalibrationRecord) -> pipeline.BranchResult:
    result = pipeline.branch(plan, variant, calibration)
    get_run_logger().info("%s: perplexity %.4f (%s)", variant.name, result.evaluation.perplexity, "cached" if result.cached else "computed")
    return result


@task(name="deliver", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_no_retry_on_user_error)
def deliver_task(plan: pipeline.Plan, stage: pipeline.Stage, branches: list[pipeline.BranchResult]) -> str:
    with store_credentials(plan.spec):
        return str(pipeline.deliver(plan, stage, branches, progress=get_run_logger().info))
