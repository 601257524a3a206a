"""The quantflow DAG as Prefect flows, one task per stage.

plan -> calibration | baseline (concurrent) -> per variant: [sensitivity ->] quantize -> evaluate -> report
-> per variant: upload -> store-report (with a store) -> artifacts.

By default one flow run builds the variants in turn: one worker owns one accelerator, and
timings taken while another variant computes on the same card would be wrong. With
``variant_deployment`` set, the baseline and then every variant run as separate flow runs
of ``quantflow-variant`` on that deployment's pool, so each idle GPU worker takes one; the
parent then gathers their records from the shared cache by their content keys and delivers.
The parameters are Pydantic models, so the Prefect UI renders a form with descriptions,
dropdowns and validation at submit time.

No ``from __future__ import annotations`` here: ``Flow.serve`` pickles the flow (cloudpickle) into the process
that runs it, and a pickled function keeps only the globals its body uses. Prefect builds the parameter model
from the annotations there; a postponed ``"RunSpec"`` could not be resolved, and every served run failed
before it began. Real annotations travel with the function.
"""

from typing import Annotated, Any
from uuid import UUID

from prefect import flow
from prefect.artifacts import update_progress_artifact
from prefect.logging import get_run_logger
from prefect.logging.loggers import flow_run_logger
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator

from quantflow.errors import QuantflowError
from quantflow.infra.steps import steps_stop_on_interrupt
from quantflow.pipeline import steps
from quantflow.pipeline.planning import Plan
from quantflow.reporting.report import FailedVariant, VariantResult
from quantflow.spec import MixedVariant, RunSpec, explain
from tasks.artifacts import links_task, progress_task, publish_run_artifacts, run_name
from tasks.dispatch import dispatch_task
from tasks.stages import (
    baseline_task,
    calibration_task,
    detached,
    evaluate_task,
    gather_task,
    plan_task,
    quantize_task,
    report_task,
    sensitivity_task,
    store_report_task,
    upload_task,
)

VARIANT_DEPLOYMENT = Field(
    None,
    description="Fan out: run the baseline and each variant as a flow run of this deployment (e.g. "
    "'quantflow-variant/variant'), one per idle worker. Needs output.cache_dir on storage all workers share. Empty: "
    "variants run in turn here.",
)

USER_ERROR = "quantflow_user_error"  # marks that log record: the CLI prints the error itself


def _explained(value: Any, handler: ValidatorFunctionWrapHandler) -> RunSpec:
    """A spec the form (or an API call) got wrong fails with the CLI's one-line error instead of Prefect's dump of
    Pydantic's errors: a QuantflowError passes through Pydantic and Prefect's parameter check unchanged."""
    try:
        return handler(value)
    except ValidationError as error:
        raise explain(error, "the flow run's parameters") from None


FormSpec = Annotated[RunSpec, WrapValidator(_explained)]  # the same JSON schema, so the same form


def say_user_error(flow, flow_run, state) -> None:
    """Bad input's ``error: ... fix: ...``, as the CLI prints it, as a line of the run's log: the UI's run page shows
    the log, where Prefect's own lines bury the message in a repr or (a bad parameter) say nothing."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, QuantflowError):
        flow_run_logger(flow_run, flow).error(f"error: {error}", extra={USER_ERROR: True})


# both flows: named runs, parameters checked at the start, bad input said in the run's log
FLOW_OPTIONS = {
    "flow_run_name": run_name,
    "log_prints": True,
    "validate_parameters": True,
    "on_failure": [say_user_error],
}


@flow(name="quantflow", **FLOW_OPTIONS)
def quantflow_run(spec: FormSpec = RunSpec(), variant_deployment: str | None = VARIANT_DEPLOYMENT) -> str:
    """Quantize a model into every variant of the spec, evaluate them all, write the report, upload."""
    with steps_stop_on_interrupt():  # a terminated run ends Crashed at once, not when its running steps finish
        planned = plan_task(spec)
        progress = progress_task()
        if variant_deployment:
            gathered = _fanned_out(planned, variant_deployment, progress)
            calibration, baseline, variants, held = gathered.calibration, gathered.baseline, gathered.variants, []
            plan, failed = _for_later_tasks(planned), []
        else:
            calibration, baseline = calibration_task.submit(planned), baseline_task.submit(planned)
            plan = _for_later_tasks(planned)
            baseline.wait()  # variants share the accelerator with the baseline: they start once it is measured
            variants, failed, held = _in_turn(plan, calibration, baseline, progress)
        out, report_uri = report_task(plan, calibration, baseline, variants, failed), None
        if spec.output.store:
            stored = [upload_task.submit(plan, v, out) for v in variants if v.artifact]
            report_uri = store_report_task(plan, calibration, baseline, variants, stored, failed)
        publish_run_artifacts(out)
        if report_uri:
            links_task(out, spec, report_uri)
        del held  # only now may the quantize results' ids be reused
        return out


def _for_later_tasks(planned: Plan) -> Plan:
    """The plan for the tasks after calibration and baseline: a copy that shares no object with the plan task's result.

    Every task reads the plan, but Prefect links a task to a later one by the id() of the result's parts: given the
    plan task's own result, each task drew an edge from it (about 45 in the demo's graph). With the copy, the graph
    shows what each task consumes (calibration, baseline, quantize, evaluate). The caller keeps the original until the
    flow returns: a freed part's id, reused by a new object, would link the plan task again.
    """
    return detached(planned)


def _quantized(plan: Plan, variant, calibration, held: list):
    """The quantize task's artifact; a load-time (bitsandbytes) variant has no quantize task, a mixed one measures
    its sensitivity in a task of its own first. Task results go into ``held`` (see ``_in_turn``)."""
    if steps.load_time(variant):
        return steps.unquantized(variant)
    measured = sensitivity_task(plan, variant, calibration) if isinstance(variant, MixedVariant) else None
    held.append(measured)
    held.append(quantize_task(plan, variant, calibration, measured))
    return held[-1]


def _in_turn(plan: Plan, calibration, baseline, progress: UUID) -> tuple[list[VariantResult], list, list]:
    """Each variant quantized then evaluated, one after another on the one accelerator.

    The sensitivity and quantize results are returned for the flow to hold until it ends: Prefect links a task
    to a later task's inputs by the ``id()`` of its result's plain parts (strings, lists). Once a quantize
    result was freed, a new string at its old address drew a false quantize -> report edge in the UI.
    """
    variants, failed, held = [], [], []
    for done, variant in enumerate(plan.variants, start=1):
        result = _built(plan, variant, calibration, baseline, held)
        (failed if isinstance(result, FailedVariant) else variants).append(result)
        update_progress_artifact(progress, 100.0 * done / len(plan.variants))
    return variants, failed, held


def _built(plan: Plan, variant, calibration, baseline, held: list) -> VariantResult | FailedVariant:
    """One variant's tasks; a failed one (its task run shows Failed in the UI) becomes a report row, as in
    ``steps.build_variant``, and the next variant runs."""
    stage = "quantize"
    try:
        quantized = _quantized(plan, variant, calibration, held)
        stage = "evaluate"
        return evaluate_task(plan, variant, quantized, baseline)
    except Exception as error:  # any failure of one variant: the run goes on and reports it
        get_run_logger().warning("variant %s failed at %s: %s", variant.name, stage, error)
        return steps.failure(plan, variant, stage, error)


def _fanned_out(plan: Plan, deployment: str, progress: UUID):
    """Baseline first (every variant's KL needs it), then all variants at once; then gather their records by key."""
    dispatch_task(deployment, plan.spec, None)
    futures = [dispatch_task.submit(deployment, plan.spec, variant.name) for variant in plan.variants]
    for done, future in enumerate(futures, start=1):
        future.result()
        update_progress_artifact(progress, 100.0 * done / len(futures))
    return gather_task(plan, wait_for=futures)


@flow(name="quantflow-variant", **FLOW_OPTIONS)
def quantflow_variant(
    spec: FormSpec, variant: str | None = Field(None, description="Variant name from the spec; empty: baseline only.")
) -> None:
    """One branch of a fanned-out run: calibration and baseline (cache hits after the first), then one variant."""
    with steps_stop_on_interrupt():
        planned = plan_task(spec)
        plan = _for_later_tasks(planned)
        chosen = plan.variant(variant) if variant is not None else None  # a name from the spec or its sweep
        calibration, baseline = calibration_task.submit(planned), baseline_task.submit(planned)
        baseline.wait()
        if chosen is not None:
            held: list = []
            evaluate_task(plan, chosen, _quantized(plan, chosen, calibration, held), baseline)
