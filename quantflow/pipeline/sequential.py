"""The whole run in this process, stage after stage: the plain CLI (``--engine local``), notebooks and tests.

The Prefect flow in ``flows/`` runs the very same stage functions as tasks, so both paths
produce identical artifacts and share one cache.
"""

from __future__ import annotations

from pathlib import Path

from quantflow.delivery.publish import publish_variants, upload_report, upload_variant
from quantflow.errors import QuantflowError
from quantflow.infra.progress import stage
from quantflow.pipeline import steps
from quantflow.pipeline.planning import Progress, plan
from quantflow.reporting.report import FailedVariant, build_report, write_report
from quantflow.spec import RunSpec


def run(spec: RunSpec, progress: Progress = print) -> Path:
    """Plan, calibrate, evaluate the baseline, build and evaluate every variant in turn, then deliver."""
    if spec.output.store and spec.output.store.credentials_block:
        raise QuantflowError(
            f"output.store.credentials_block ({spec.output.store.credentials_block}) is read only when the run "
            "executes under Prefect",
            "use the Prefect engine (the CLI's default), or drop the block and use AWS credentials from the "
            "environment or a profile",
        )
    the_plan = plan(spec, progress)
    spec = the_plan.spec  # output.dir filled in
    progress(f"device: {the_plan.device}; cache: {the_plan.cache_root}")
    calibration = steps.calibrate(the_plan)
    if calibration.record.note:
        progress(f"warning: {calibration.record.note}")
    baseline = steps.evaluate_baseline(the_plan)
    progress(
        f"baseline perplexity {baseline.evaluation.perplexity:.3f} ({'cached' if baseline.step.cached else 'computed'})"
    )
    variants, failed = [], []
    for variant in the_plan.variants:
        result = steps.build_variant(the_plan, variant, calibration.record, baseline)
        if isinstance(result, FailedVariant):
            progress(f"variant {variant.name} failed at {result.stage}: {result.error}")
            failed.append(result)
            continue
        progress(
            f"variant {variant.name}: perplexity {result.evaluation.perplexity:.3f} "
            f"({'cached' if result.cached else 'computed'})"
        )
        variants.append(result)
    inputs = (
        spec,
        the_plan.model,
        calibration.record,
        baseline.evaluation,
        variants,
        [calibration.step, baseline.step],
    )
    out = Path(spec.output.dir)
    with stage("report") as shown:
        report = build_report(*inputs, dropped=the_plan.dropped, failed=failed)
        publish_variants(report, variants, out)
        write_report(report, out)
        shown.outcome = f"best: {report.best or 'none'}"
    if spec.output.store:
        stored = [
            upload_variant(spec, the_plan.model, report, v, out, the_plan.device, the_plan.cache.root, progress)
            for v in variants
            if v.artifact
        ]
        report = build_report(*inputs, stored, the_plan.dropped, failed)
        write_report(report, out)
        upload_report(spec, the_plan.model, report, out, progress)
    progress(f"report: {out / 'report.md'}")
    return out
