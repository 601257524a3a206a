"""The whole run as four stages: plan -> baseline + calibration -> one branch per variant -> deliver.

``run`` chains them in one process for the plain CLI and notebooks; the Prefect flow in
``flows/`` calls the same stage functions as tasks, so both paths produce identical
artifacts and share one cache.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from quantflow import steps
from quantflow.cache import StepCache, content_key, default_cache_root
from quantflow.calibration import CalibrationRecord
from quantflow.corpus import check_source
from quantflow.errors import QuantflowError
from quantflow.evaluate import EvalRecord
from quantflow.int4 import GROUP_SIZES
from quantflow.quantize import QuantizeRecord, check_ignore, resolve_group_size, weightless_model
from quantflow.resources import pick_device
from quantflow.sources import ModelRef, resolve_model
from quantflow.spec import BnbVariant, RunSpec, Variant
from quantflow.steps import StepRun

R = TypeVar("R")

Progress = Callable[[str], None]


class Plan(BaseModel):
    """A validated run: every check that can fail before heavy work has passed."""

    spec: RunSpec
    model: ModelRef
    device: str
    cache_root: str
    group_sizes: dict[str, tuple[int | None, str | None]]
    gather_only: bool = False

    @property
    def cache(self) -> StepCache:
        return StepCache(Path(self.cache_root), read_only=self.gather_only)

    def baseline_key(self) -> str:
        return steps.eval_key(self.model.fingerprint, self.spec.evaluation, self.device, None)


class BranchResult(BaseModel):
    name: str
    method: str
    quantize: QuantizeRecord | None
    evaluation: EvalRecord
    artifact: str | None
    steps: list[StepRun]

    @property
    def cached(self) -> bool:
        return all(step.cached for step in self.steps)


class Stage(BaseModel):
    baseline: EvalRecord
    calibration: CalibrationRecord
    steps: list[StepRun]

    @property
    def cached(self) -> bool:
        return all(step.cached for step in self.steps)


def timed(step: str, variant: str, key: str, call: Callable[[], tuple[R, bool]]) -> tuple[R, StepRun]:
    """Run one step call and say what it did (cache hit or computed) and how long the call took."""
    start = time.perf_counter()
    record, hit = call()
    return record, StepRun(step=step, variant=variant, key=key, cached=hit, seconds=round(time.perf_counter() - start, 3))


def check_environment(spec: RunSpec) -> None:
    """Refuse variants this machine cannot run, before anything is loaded."""
    from quantflow.environment import package_version

    bnb = [v.name for v in spec.variants if isinstance(v, BnbVariant)]
    if bnb and package_version("bitsandbytes") is None:
        raise QuantflowError(f"variants {', '.join(bnb)} need bitsandbytes, which is not installed", "pip install 'quantflow[bnb]' or drop those variants")
    if spec.evaluation.lm_eval:
        from quantflow.lm_eval_tasks import check_tasks

        check_tasks(spec.evaluation.lm_eval)


def check_folder(field: str, folder: Path) -> None:
    """A folder the run will write must be a folder, or creatable: found now, not after an hour of GPU work."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise QuantflowError(f"{field} {folder} cannot be a folder: {existing} is a file", f"point {field} at a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise QuantflowError(f"{field} {folder} is not writable ({existing} is read-only for this user)", f"point {field} at a writable folder")


def plan(spec: RunSpec, progress: Progress = print) -> Plan:
    """Validate the spec against this machine and the model's shapes; resolve the model source."""
    device = pick_device(spec.device)
    check_environment(spec)
    cache = StepCache(spec.output.cache_dir or default_cache_root())
    check_folder("output.dir", Path(spec.output.dir))
    check_folder("output.cache_dir", cache.root)
    check_source("calibration.source", spec.calibration.source)
    check_source("evaluation.corpus", spec.evaluation.corpus)
    if spec.output.store:
        from quantflow.store import check_access

        check_access(spec.output.store)
    progress(f"model: resolving {spec.model.source}")
    model = resolve_model(spec.model, cache)
    skeleton = weightless_model(model.path, spec.model.trust_remote_code)
    group_sizes = {}
    for variant in spec.variants:
        if isinstance(variant, BnbVariant):
            continue
        check_ignore(skeleton, variant)
        group_sizes[variant.name] = resolve_group_size(skeleton, variant)
        if spec.evaluation.kernels == "int4" and (variant.bits != 4 or group_sizes[variant.name][0] not in GROUP_SIZES):
            raise QuantflowError(f"variant '{variant.name}' ({variant.bits} bits, group size {group_sizes[variant.name][0]}) cannot run on the int4 "
                                 f"kernels, which need 4 bits in groups of {GROUP_SIZES}", "set evaluation.kernels to 'auto' or 'dense', or change the variant")
    return Plan(spec=spec, model=model, device=device, cache_root=str(cache.root), group_sizes=group_sizes)


def baseline_and_calibration(plan: Plan, isolate: bool = True) -> Stage:
    key = steps.calibration_key(plan.model, plan.spec.calibration, plan.spec.evaluation)
    calibration, cal_run = timed("calibration", "baseline", key, lambda: steps.calibrate(plan.cache, plan.model, plan.spec, isolate))
    baseline, base_run = timed("evaluate", "baseline", plan.baseline_key(), lambda: steps.evaluate(
        plan.cache, "baseline", plan.baseline_key(), plan.spec, plan.model.path, plan.device, None, None, isolate))
    return Stage(baseline=baseline, calibration=calibration, steps=[cal_run, base_run])


def branch(plan: Plan, variant: Variant, calibration: CalibrationRecord, isolate: bool = True) -> BranchResult:
    """Quantize (unless load-time) and evaluate one variant."""
    spec, name = plan.spec, variant.name
    if isinstance(variant, BnbVariant):
        subject = content_key("bnb", plan.model.fingerprint, variant.model_dump(exclude={"name", "save"}))
        key = steps.eval_key(subject, spec.evaluation, plan.device, plan.baseline_key())
        evaluation, run = timed("evaluate", name, key, lambda: steps.evaluate(
            plan.cache, name, key, spec, plan.model.path, plan.device, variant, plan.baseline_key(), isolate))
        return BranchResult(name=name, method=variant.method, quantize=None, evaluation=evaluation, artifact=None, steps=[run])
    group_size, note = plan.group_sizes[name]
    q_key = steps.quantize_key(plan.model, variant, group_size, calibration, spec.model.dtype, plan.device)
    record, q_run = timed("quantize", name, q_key, lambda: steps.quantize(
        plan.cache, plan.model, variant, group_size, note, calibration, spec.model.dtype, plan.device, isolate,
        spec.step_timeout_s, spec.gpu_memory_gb))
    key = steps.eval_key(Path(record.path).name, spec.evaluation, plan.device, plan.baseline_key())
    evaluation, e_run = timed("evaluate", name, key, lambda: steps.evaluate(
        plan.cache, name, key, spec, record.path, plan.device, None, plan.baseline_key(), isolate))
    return BranchResult(name=name, method=variant.method, quantize=record, evaluation=evaluation, artifact=record.path,
                        steps=[q_run, e_run])


def publish_folder(source: Path, target: Path, extra: dict[str, str]) -> None:
    """Copy ``source`` to ``target`` with extra files, replacing any old copy only once the new one is whole."""
    scratch = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, scratch, ignore=shutil.ignore_patterns("result.json", ".*"))
        for name, text in extra.items():
            (scratch / name).write_text(text)
        if target.exists():
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            scratch.rename(target)
            shutil.rmtree(old)
        else:
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def deliver(plan: Plan, stage: Stage, branches: list[BranchResult], progress: Progress = print) -> Path:
    """Write variant folders (with model cards), report.json, report.md and plots; upload them when a store is set."""
    from quantflow.report import build_report, model_card, write_report

    out = Path(plan.spec.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(plan, stage, branches)
    for result in branches:
        if result.artifact:
            publish_folder(Path(result.artifact), out / result.name, {"README.md": model_card(report, result.name)})
    if plan.spec.output.store:
        report = upload_variants(plan, report, branches, out, progress)
    write_report(report, out)
    if plan.spec.output.store:
        upload_report(plan, report, out, progress)
    return out


def upload_variants(plan: Plan, report, branches: list[BranchResult], out: Path, progress: Progress):
    """Upload each delivered variant under its content hash; the report records where each went."""
    from quantflow.environment import environment
    from quantflow.roundtrip import roundtrip
    from quantflow.store import artifact_prefix, upload, upload_progress

    store = plan.spec.output.store
    rows = {row.name: row for row in report.rows}
    for result in branches:
        if not result.artifact:
            continue
        prefix = artifact_prefix(store, plan.model.source, result.name, Path(result.artifact).name)
        meta = {"model": plan.model.model_dump(), "variant": result.name, "calibration_hash": report.calibration["hash"],
                "metrics": rows[result.name].model_dump(), "spec": plan.spec.model_dump(mode="json"), "environment": environment()}
        record = upload(out / result.name, store, prefix, meta, upload_progress(progress))
        progress(f"stored {result.name}: {record.uri} ({record.bytes_sent} bytes sent{', already complete' if record.already_complete else ''})")
        update = {"artifact_uri": record.uri}
        if store.roundtrip_windows:
            check = roundtrip(record.uri, store, out / result.name, plan.spec, plan.device, plan.cache.root / "roundtrip")
            progress(f"round trip {result.name}: pulled copy scores {check.perplexity_pulled:.4f} on {check.windows} windows, as the local copy")
            update["roundtrip"] = check.model_dump()
        rows[result.name] = rows[result.name].model_copy(update=update)
    return report.model_copy(update={"rows": [rows[row.name] for row in report.rows]})


def upload_report(plan: Plan, report, out: Path, progress: Progress) -> str:
    """Upload report.json, report.md and plots beside the variants, under the run's content hash."""
    from quantflow.store import artifact_prefix, upload

    folder = out / ".report-upload"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in ("report.json", "report.md", "quality_vs_size.png", "throughput_vs_memory.png"):
        if (out / name).exists():
            shutil.copy2(out / name, folder / name)
    run_hash = content_key(plan.spec.model_dump(mode="json", exclude={"output"}), plan.model.fingerprint, report.calibration["hash"])
    record = upload(folder, plan.spec.output.store, artifact_prefix(plan.spec.output.store, plan.model.source, "reports", run_hash), {"kind": "report"})
    shutil.rmtree(folder)
    progress(f"stored report: {record.uri}")
    return record.uri


def run(spec: RunSpec, progress: Progress = print) -> Path:
    """Plan, calibrate, evaluate the baseline, build every variant in turn, then deliver."""
    if spec.output.store and spec.output.store.credentials_block:
        raise QuantflowError(f"output.store.credentials_block ({spec.output.store.credentials_block}) is read only when the run executes under Prefect",
                             "use the Prefect engine (the CLI's default), or drop the block and use AWS credentials from the environment or a profile")
    the_plan = plan(spec, progress)
    progress(f"device: {the_plan.device}; cache: {the_plan.cache_root}")
    progress("baseline + calibration")
    stage = baseline_and_calibration(the_plan)
    progress(f"baseline perplexity {stage.baseline.perplexity:.3f} ({'cached' if stage.cached else 'computed'})")
    if stage.calibration.note:
        progress(f"warning: {stage.calibration.note}")
    branches = []
    for variant in spec.variants:
        progress(f"variant {variant.name}: quantize + evaluate")
        result = branch(the_plan, variant, stage.calibration)
        progress(f"variant {variant.name}: perplexity {result.evaluation.perplexity:.3f} ({'cached' if result.cached else 'computed'})")
        branches.append(result)
    out = deliver(the_plan, stage, branches, progress)
    progress(f"report: {out / 'report.md'}")
    return out
