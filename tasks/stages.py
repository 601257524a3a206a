"""One Prefect task per pipeline stage, each a thin wrapper of one core function.

Domain logic lives in ``quantflow.pipeline`` and ``quantflow.delivery``; these wrappers add
what Prefect is for: names the UI shows, logging, retries where a retry can help, and the
``quantflow-accelerator`` tag on GPU stages (a global concurrency limit on that tag,
``prefect concurrency-limit create quantflow-accelerator 1``, keeps one card from being
oversubscribed). Caching is content-addressed inside the core (keys hash model content, variant
config, calibration and library versions), so a re-run returns from these tasks in seconds
without Prefect result storage. The tasks set no Prefect timeout: these tasks run in worker
threads, where Prefect's timeout cannot interrupt a blocking call (it logs a warning saying so for
every task); the spec's ``step_timeout_s`` stops a stuck step by killing the step's process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel

from quantflow.delivery.publish import publish_variants, upload_report, upload_variant
from quantflow.errors import QuantflowError, TransientError
from quantflow.infra.progress import stage
from quantflow.pipeline import planning, steps
from quantflow.reporting.report import (
    FailedVariant,
    Report,
    StoredArtifact,
    VariantResult,
    build_report,
    load_report,
    write_report,
)
from quantflow.spec import RunSpec, Variant
from tasks.credentials import store_credentials
from tasks.progress import shown_in_ui

ACCELERATOR_TAG = "quantflow-accelerator"
R = TypeVar("R", bound=BaseModel)
ON_ACCELERATOR = {"cache_policy": NO_CACHE, "tags": [ACCELERATOR_TAG]}


def retry_io_only(task, task_run, state) -> bool:
    """Retry what a retry can cure (a store or disk that failed for a moment), never bad input."""
    try:
        state.result()
    except TransientError:
        return True
    except QuantflowError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def detached(record: R) -> R:
    """A copy of a task's result that shares no object (not even a string) with anything the flow holds.

    Prefect draws an edge from a task to every later task whose inputs contain one of the task's
    result's parts, matched by ``id()``. A result that reused, say, a variant name from the spec
    would link the task to every later task that receives the plan: edges the pipeline does not
    have. A round trip through the standard json module (no string cache) gives every part a new identity.
    """
    return type(record).model_validate(json.loads(record.model_dump_json()))


def _did(step) -> str:
    return "cached" if step is None or step.cached else f"computed in {step.seconds:.1f} s"


@task(
    name="plan",
    task_run_name="plan",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_io_only,
)
@shown_in_ui
def plan_task(spec: RunSpec) -> planning.Plan:
    """Validate the spec against the model's shapes and this machine; download or convert the model."""
    with store_credentials(spec):  # an s3:// model source reads with the same credentials
        return detached(planning.plan(spec, progress=get_run_logger().info))


@task(name="calibration", task_run_name="calibration", cache_policy=NO_CACHE)
@shown_in_ui
def calibration_task(plan: planning.Plan) -> steps.Calibrated:
    """Tokenize the calibration set (CPU work: it runs beside the baseline's evaluation)."""
    calibrated = steps.calibrate(plan)
    record = calibrated.record
    get_run_logger().info(
        "calibration %s: %d samples, %d tokens (%s)", record.hash, record.samples, record.tokens, _did(calibrated.step)
    )
    return detached(calibrated)


@task(name="baseline", task_run_name="baseline", **ON_ACCELERATOR)
@shown_in_ui
def baseline_task(plan: planning.Plan) -> steps.Baseline:
    """Evaluate the unquantized model: the reference every variant is compared with."""
    baseline = steps.evaluate_baseline(plan)
    return detached(baseline)


@task(name="sensitivity", task_run_name="sensitivity {variant.name}", **ON_ACCELERATOR)
@shown_in_ui
def sensitivity_task(plan: planning.Plan, variant: Variant, calibration: steps.Calibrated) -> steps.Sensitivity:
    """Score every Linear group of a mixed variant at every menu option on the calibration set."""
    measured = steps.measure(plan, variant, calibration.record)
    record = measured.record
    get_run_logger().info(
        "%s: %s sensitivity of %d groups on %d tokens (%s)",
        variant.name,
        record.measure,
        record.groups,
        record.tokens,
        _did(measured.step),
    )
    return detached(measured)


@task(name="quantize", task_run_name="quantize {variant.name}", **ON_ACCELERATOR)
@shown_in_ui
def quantize_task(
    plan: planning.Plan,
    variant: Variant,
    calibration: steps.Calibrated,
    sensitivity: steps.Sensitivity | None = None,
) -> steps.Quantized:
    """Quantize one variant with llm-compressor (a mixed variant from its sensitivity table)."""
    quantized = steps.quantize(plan, variant, calibration.record, sensitivity=sensitivity)
    return detached(quantized)


@task(name="evaluate", task_run_name="evaluate {variant.name}", **ON_ACCELERATOR)
@shown_in_ui
def evaluate_task(
    plan: planning.Plan, variant: Variant, quantized: steps.Quantized, baseline: steps.Baseline
) -> VariantResult:
    """Evaluate one variant under the baseline's protocol (KL from the baseline's log-probabilities)."""
    result = steps.evaluate(plan, variant, quantized, baseline)
    return detached(result)


@task(name="gather", task_run_name="gather", cache_policy=NO_CACHE)
@shown_in_ui
def gather_task(plan: planning.Plan) -> steps.Gathered:
    """Read a fanned-out run's records from the shared cache by their keys (fails if a worker's result is missing)."""
    return detached(steps.gather(plan))


def _report(
    plan: planning.Plan,
    calibration: steps.Calibrated,
    baseline: steps.Baseline,
    variants: list[VariantResult],
    stored: list[StoredArtifact] | None = None,
    failed: list[FailedVariant] | None = None,
) -> Report:
    return build_report(
        plan.spec,
        plan.model,
        calibration.record,
        baseline.evaluation,
        variants,
        [calibration.step, baseline.step],
        stored or [],
        plan.dropped,
        failed or [],
    )


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
@shown_in_ui
def report_task(
    plan: planning.Plan,
    calibration: steps.Calibrated,
    baseline: steps.Baseline,
    variants: list[VariantResult],
    failed: list[FailedVariant] | None = None,
) -> str:
    """Write the variant folders with model cards, report.json, report.md and the plots (failed variants as rows)."""
    out = Path(plan.spec.output.dir)
    with stage("report") as shown:
        report = _report(plan, calibration, baseline, variants, failed=failed)
        publish_variants(report, variants, out)
        write_report(report, out)
        shown.outcome = f"best: {report.best or 'none'}"
    get_run_logger().info("report: %s (best: %s)", out / "report.md", report.best or "none")
    return str(out)


@task(
    name="upload",
    task_run_name="upload {variant.name}",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[10, 30, 90],
    retry_condition_fn=retry_io_only,
)
@shown_in_ui
def upload_task(plan: planning.Plan, variant: VariantResult, out: str) -> StoredArtifact:
    """Upload one delivered variant (retried on I/O errors only; a retry sends just what is missing)."""
    with store_credentials(plan.spec):
        report = load_report(Path(out) / "report.json")
        stored = upload_variant(
            plan.spec,
            plan.model,
            report,
            variant,
            Path(out),
            plan.device,
            plan.cache.root,
            progress=get_run_logger().info,
        )
    return detached(stored)


@task(
    name="store-report",
    task_run_name="store report",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[10, 30, 90],
    retry_condition_fn=retry_io_only,
)
@shown_in_ui
def store_report_task(
    plan: planning.Plan,
    calibration: steps.Calibrated,
    baseline: steps.Baseline,
    variants: list[VariantResult],
    stored: list[StoredArtifact],
    failed: list[FailedVariant] | None = None,
) -> str:
    """Rewrite the report with every variant's store URI and upload it beside the variants."""
    out = Path(plan.spec.output.dir)
    report = _report(plan, calibration, baseline, variants, stored, failed)
    write_report(report, out)
    with store_credentials(plan.spec):
        return upload_report(plan.spec, plan.model, report, out, progress=get_run_logger().info)
