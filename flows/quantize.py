"""The quantflow DAG as Prefect flows.

plan -> baseline + calibration -> one branch per variant (quantize -> evaluate) -> deliver
(variant folders, report, upload) -> artifacts.

By default one flow run does the branches in turn: one worker owns one accelerator, and
timings taken while another variant computes on the same card would be wrong. With
``variant_deployment`` set, the baseline and then every variant run as separate flow runs
of ``quantflow-variant`` on that deployment's pool, so each idle GPU worker takes one; the
parent then gathers their results from the shared cache (a gather that finds a result
missing fails instead of redoing it) and delivers. The parameters are Pydantic models, so
the Prefect UI renders a form with descriptions, dropdowns and validation at submit time.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import Field

from quantflow.pipeline import BranchResult, Plan, Stage
from quantflow.spec import RunSpec
from tasks.artifacts import publish_run_artifacts
from tasks.dispatch import dispatch_task
from tasks.pipeline import baseline_task, branch_task, deliver_task, plan_task

VARIANT_DEPLOYMENT = Field(
    None, description="Fan out: run the baseline and each variant as a flow run of this deployment (e.g. 'quantflow-variant/variant'), "
                      "one per idle worker. Needs output.cache_dir on storage all workers share. Empty: variants run in turn here.")


@flow(name="quantflow", log_prints=True, validate_parameters=True)
def quantflow_run(spec: RunSpec = RunSpec(), variant_deployment: str | None = VARIANT_DEPLOYMENT) -> str:
    """Quantize a model into every variant of the spec, evaluate them all, write the report."""
    plan = plan_task(spec)
    progress = create_progress_artifact(0.0, key="quantflow-progress", description="variants finished (%)")
    if variant_deployment:
        stage, branches = _fanned_out(plan, variant_deployment, progress)
    else:
        stage = baseline_task(plan)
        branches = []
        for variant in spec.variants:
            branches.append(branch_task(plan, variant, stage.calibration))
            update_progress_artifact(progress, 100.0 * len(branches) / len(spec.variants))
    out = deliver_task(plan, stage, branches)
    publish_run_artifacts(Path(out))
    return out


def _fanned_out(plan: Plan, deployment: str, progress: UUID) -> tuple[Stage, list[BranchResult]]:
    """Baseline first (every variant's KL needs it), then all variants at once; then gather from the cache."""
    dispatch_task(deployment, plan.spec, None)
    futures = [dispatch_task.submit(deployment, plan.spec, variant.name) for variant in plan.spec.variants]
    for done, future in enumerate(futures, start=1):
        future.result()
        update_progress_artifact(progress, 100.0 * done / len(futures))
    gather = plan.model_copy(update={"gather_only": True})
    stage = baseline_task(gather)
    return stage, [branch_task(gather, variant, stage.calibration) for variant in plan.spec.variants]


@flow(name="quantflow-variant", log_prints=True, validate_parameters=True)
def quantflow_variant(spec: RunSpec, variant: str | None = Field(None, description="Variant name from the spec; empty: baseline only.")) -> None:
    """One branch of a fanned-out run: baseline + calibration (a cache hit after the first), then one variant."""
    plan = plan_task(spec)
    stage = baseline_task(plan)
    if variant is None:
        return
    chosen = [v for v in spec.variants if v.name == variant]
    if not chosen:
        raise ValueError(f"variant '{variant}' is not in the spec (it has {', '.join(v.name for v in spec.variants)})")
    branch_task(plan, chosen[0], stage.calibration)
