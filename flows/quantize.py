"""The quantflow DAG as a Prefect flow.

plan -> baseline + calibration -> one branch per variant (quantize -> evaluate) -> deliver
(variant folders, report) -> artifacts. Inside one flow run the branches run in turn: one
worker owns one accelerator, and timings taken while another variant is computing would be
wrong. Several workers spread variants as separate flow runs (see ``the GPU pool deployment in prefect.yaml``). The parameter is the run spec, which the
Prefect UI renders as a form (descriptions, enums as dropdowns, validation at submit time).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from quantflow.spec import RunSpec
from tasks.artifacts import publish_run_artifacts
from tasks.pipeline import baseline_task, branch_task, deliver_task, plan_task


@flow(name="quantflow", log_prints=True, validate_parameters=True)
def quantflow_run(spec: RunSpec = RunSpec()) -> str:
    """Quantize a model into every variant of the spec, evaluate them all, write the report."""
    plan = plan_task(spec)
    stage = baseline_task(plan)
    progress = create_progress_artifact(0.0, key="quantflow-progress", description="variants finished (%)")
    branches = []
    for variant in spec.variants:
        branches.append(branch_task(plan, variant, stage.calibration))
        update_progress_artifact(progress, 100.0 * len(branches) / len(spec.variants))
    out = deliver_task(plan, stage, branches)
    publish_run_artifacts(Path(out))
    return out
