"""The pipeline's stages as cached steps: calibration, baseline, and per variant quantize then evaluate.

Each stage takes the plan plus the small records it depends on, and returns a small record
that carries what it did (``StepRun``: cache hit or computed). The cache keys are the
contract of resumability: each hashes everything its step's output depends on, and
``gather`` rebuilds a finished run from them alone (what a fanned-out parent does).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.evaluation.evaluate import BASELINE_LOGPROBS, EvalRecord
from quantflow.evaluation.runtime import Protocol, Subject, evaluate_subject
from quantflow.infra import progress
from quantflow.infra.cache import content_key
from quantflow.infra.environment import code_version
from quantflow.infra.steps import StepRun, cached
from quantflow.inputs.calibration import SAMPLES_VERSION, CalibrationRecord, build_calibration
from quantflow.pipeline.planning import BASELINE, Plan
from quantflow.quantization.kv_cache import KV_LABELS, RUNTIME_KV
from quantflow.quantization.mixed import MIXED_VERSION
from quantflow.quantization.quantize import QuantizeRecord, quantize_weights
from quantflow.quantization.sensitivity import SensitivityRecord
from quantflow.quantization.sensitivity_step import measure_sensitivity
from quantflow.reporting.report import CalibrationUse, FailedVariant, VariantResult
from quantflow.spec import (
    BnbVariant,
    CalibrationChoice,
    CalibrationSpec,
    GPTQVariant,
    KVCacheVariant,
    MixedVariant,
    PlannedVariant,
    Variant,
    needs_calibration,
)

QUANT_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors")
EVAL_PACKAGES = ("torch", "transformers", "compressed-tensors", "bitsandbytes", "lm-eval")


class Calibrated(BaseModel):
    record: CalibrationRecord
    step: StepRun


class Baseline(BaseModel):
    evaluation: EvalRecord
    key: str
    step: StepRun


class Sensitivity(BaseModel):
    """A mixed variant's sensitivity table (its own cached step: several budgets over one menu share it)."""

    variant: str
    record: SensitivityRecord
    step: StepRun


class Quantized(BaseModel):
    """A weight variant's artifact, or for a load-time (bitsandbytes) variant nothing: it is quantized as it loads."""

    variant: str
    record: QuantizeRecord | None
    step: StepRun | None
    sensitivity: Sensitivity | None = None
    calibration: Calibrated | None = None  # the variant's own calibration set, when it asks for one


def calibration_spec(plan: Plan, choice: CalibrationChoice | None) -> CalibrationSpec:
    """The calibration settings a variant's own source gives (the run's sample count, length and seed kept)."""
    return choice.applied(plan.spec.calibration) if choice else plan.spec.calibration


def calibration_key(plan: Plan, choice: CalibrationChoice | None = None) -> str:
    spec = plan.spec  # the evaluation corpus decides which half of a shared source calibration may read
    return content_key(
        "calibration",
        SAMPLES_VERSION,
        plan.model.fingerprint,
        calibration_spec(plan, choice),
        spec.evaluation.corpus,
        spec.evaluation.text_column,
        code_version("transformers"),
    )


def baseline_key(plan: Plan) -> str:
    return eval_key(plan, plan.model.fingerprint, None)


def stored_kv(plan: Plan, variant: PlannedVariant) -> str:
    """The KV-cache option the variant's artifact carries: a runtime scheme (RUNTIME_KV) is none, so its twin shares
    its base row's artifact and only its evaluation differs."""
    kv_cache = plan.kv.get(variant.name, "bf16")
    return "bf16" if kv_cache in RUNTIME_KV else kv_cache


def runtime_kv(plan: Plan, variant: PlannedVariant) -> str | None:
    """The runtime KV scheme the variant is evaluated with (emulated), if any."""
    kv_cache = plan.kv.get(variant.name, "bf16")
    return kv_cache if kv_cache in RUNTIME_KV else None


def quantize_key(plan: Plan, variant: PlannedVariant, calibration: CalibrationRecord) -> str:
    kv_cache = stored_kv(plan, variant)
    # RTN's result does not depend on the calibration set; k/v scales always do
    used = calibration.hash if needs_calibration(variant) or kv_cache != "bf16" else None
    return content_key(
        "quantize",
        plan.model.fingerprint,
        variant.model_dump(exclude={"name", "calibration"}),  # the calibration set enters by its hash
        plan.schemes[variant.name].group_size,
        used,
        plan.spec.model.dtype,
        plan.device,
        code_version(*QUANT_PACKAGES),
        *([kv_cache] if kv_cache != "bf16" else []),  # a bf16 cache keeps the keys that runs before the axis wrote
        *([MIXED_VERSION] if isinstance(variant, MixedVariant) else []),  # its allocation comes from the table
    )


def sensitivity_key(plan: Plan, variant: MixedVariant, calibration: CalibrationRecord) -> str:
    """What the table depends on: not the budget nor the allocation, so variants differing only there share it. The
    final algorithm and its settings decide which error is scored (and run the direct measure's uniform pass)."""
    measured = variant.model_dump(
        include={"options", "symmetric", "ignore", "sensitivity", "sensitivity_tokens", "embeddings", "algorithm"}
    )
    if variant.algorithm == "gptq":
        measured.update(variant.model_dump(include={"block_size", "dampening_frac", "actorder", "observer"}))
    return content_key(
        "sensitivity",
        MIXED_VERSION,
        plan.model.fingerprint,
        measured,
        plan.schemes[variant.name].group_size,
        calibration.hash,
        plan.spec.model.dtype,
        plan.device,
        code_version(*QUANT_PACKAGES),
    )


def eval_key(plan: Plan, subject: str, baseline: str | None) -> str:
    measured = plan.spec.evaluation.model_dump(mode="json", exclude={"card_memory_gb"})  # the card: report arithmetic
    return content_key("evaluate", subject, measured, plan.device, baseline, code_version(*EVAL_PACKAGES))


def variant_eval_key(plan: Plan, variant: PlannedVariant, quantized: Quantized) -> str:
    if quantized.record is None:  # a load-time variant: the subject is the model plus the bitsandbytes settings
        subject = content_key("bnb", plan.model.fingerprint, variant.model_dump(exclude={"name", "save"}))
    else:
        subject = Path(quantized.record.path).name
    emulated = runtime_kv(plan, variant)  # the same artifact as its base row, evaluated with another cache
    return eval_key(plan, f"{subject}+kv-{emulated}" if emulated else subject, baseline_key(plan))


def load_time(variant: PlannedVariant) -> bool:
    """A bitsandbytes variant is quantized as it loads: it has no quantize step."""
    return isinstance(variant, BnbVariant)


def unquantized(variant: PlannedVariant) -> Quantized:
    return Quantized(variant=variant.name, record=None, step=None)


def outcome(step: StepRun, result: str = "") -> str:
    """What a stage's line says when it ends: its result, and whether it came from the cache."""
    did = "cached" if step.cached else f"{step.seconds:.1f} s"
    return f"{result} ({did})" if result else did


def calibrate(
    plan: Plan, isolate: bool = True, choice: CalibrationChoice | None = None, owner: str = BASELINE
) -> Calibrated:
    """Build (or find) the calibration set: tokenized, seeded, disjoint from the evaluation texts. ``choice`` is a
    variant's own source in place of the run's (one cached step per distinct source, shared by its variants)."""
    with progress.stage(f"calibration {choice.label()}" if choice else "calibration") as shown:
        record, step = cached(
            plan.cache,
            "calibration",
            owner,
            calibration_key(plan, choice),
            CalibrationRecord,
            build_calibration,
            plan.spec.step_timeout_s,
            isolate,
            spec=calibration_spec(plan, choice),
            evaluation=plan.spec.evaluation,
            tokenizer_path=plan.model.path,
        )
        if record.note:
            progress.note(record.note)
        shown.outcome = outcome(step, f"{record.samples} samples, {record.tokens} tokens")
    return Calibrated(record=record, step=step)


def own_calibration(plan: Plan, variant: Variant, isolate: bool = True) -> Calibrated | None:
    """The variant's own calibration set, when it names a source and reads calibration data (else None: it uses the
    run's set, or none)."""
    choice = getattr(variant, "calibration", None)
    if choice is None or not needs_calibration(variant):
        return None
    return calibrate(plan, isolate, choice, variant.name)


def evaluate_baseline(plan: Plan, isolate: bool = True) -> Baseline:
    """Evaluate the unquantized model; its saved log-probabilities are every variant's KL reference."""
    key = baseline_key(plan)
    with progress.stage(BASELINE) as shown:
        evaluation, step = evaluate_subject_once(
            plan, key, Subject(name=BASELINE, model_path=plan.model.path), None, isolate
        )
        shown.outcome = outcome(step, f"perplexity {evaluation.perplexity:.3f}")
    return Baseline(evaluation=evaluation, key=key, step=step)


def uniform_twin(plan: Plan, variant: MixedVariant, calibration: CalibrationRecord) -> QuantizeRecord | None:
    """The finished uniform W4 GPTQ artifact the direct measure would otherwise compute again, if the run has one.

    The direct measure starts from every Linear at W4 through the final pass's GPTQ recipe; a plain ``gptq`` variant
    with the same settings, group size and calibration set is that pass (the quantize step's key says so), so its
    cached result is read instead of paying a second GPTQ pass. Only when it has already finished: the variants are
    not made to wait for each other. A menu with the embeddings on it starts elsewhere (a rounded table), so not then.
    """
    if variant.sensitivity != "direct" or variant.algorithm != "gptq" or variant.embeddings:
        return None
    same = variant.model_dump(include=set(GPTQVariant.model_fields) - {"method", "calibration"})
    twin = GPTQVariant(**same)  # the mixed variant's name: its scheme's group size and KV cache are the twin's
    return plan.cache.lookup("quantize", quantize_key(plan, twin, calibration), QuantizeRecord)


def measure(plan: Plan, variant: MixedVariant, calibration: CalibrationRecord, isolate: bool = True) -> Sensitivity:
    """Score every Linear group of a mixed variant at every menu option (cached), on its own calibration set if any."""
    own = own_calibration(plan, variant, isolate)
    calibration = own.record if own else calibration
    uniform = uniform_twin(plan, variant, calibration)
    with progress.stage(f"sensitivity {variant.name}") as shown:
        record, step = cached(
            plan.cache,
            "sensitivity",
            variant.name,
            sensitivity_key(plan, variant, calibration),
            SensitivityRecord,
            measure_sensitivity,
            plan.spec.step_timeout_s,
            isolate,
            model_path=plan.model.path,
            variant=variant,
            group_size=plan.schemes[variant.name].group_size,
            calibration=calibration,
            resources=plan.resources,
            uniform=uniform.path if uniform else None,
            uniform_layers=uniform.quantized_layers if uniform else [],
        )
        shown.outcome = outcome(step, f"{record.groups} groups")
    return Sensitivity(variant=variant.name, record=record, step=step)


def quantize(
    plan: Plan,
    variant: PlannedVariant,
    calibration: CalibrationRecord,
    isolate: bool = True,
    sensitivity: Sensitivity | None = None,
) -> Quantized:
    """Quantize one weight variant with llm-compressor; a bitsandbytes variant has nothing to do here. A mixed
    variant measures its sensitivity first unless the caller (a separate Prefect task) already did."""
    if load_time(variant) or (isinstance(variant, KVCacheVariant) and runtime_kv(plan, variant)):
        return unquantized(variant)  # quantized as it loads, or the baseline's own weights with a runtime cache
    own = own_calibration(plan, variant, isolate)
    calibration = own.record if own else calibration
    if isinstance(variant, MixedVariant) and sensitivity is None:
        sensitivity = measure(plan, variant, calibration, isolate)
    with progress.stage(f"quantize {variant.name}") as shown:
        record, step = cached(
            plan.cache,
            "quantize",
            variant.name,
            quantize_key(plan, variant, calibration),
            QuantizeRecord,
            quantize_weights,
            plan.spec.step_timeout_s,
            isolate,
            model_path=plan.model.path,
            variant=variant,
            scheme=plan.schemes[variant.name],
            calibration=calibration,
            resources=plan.resources,
            sensitivity=sensitivity.record if sensitivity else None,
            kv_cache=stored_kv(plan, variant),
        )
        shown.outcome = outcome(step)
    emulated = runtime_kv(plan, variant)
    scheme = f"{record.scheme}, {KV_LABELS[emulated]}" if emulated else record.scheme
    record = record.model_copy(update={"variant": variant.name, "scheme": scheme})
    return Quantized(variant=variant.name, record=record, step=step, sensitivity=sensitivity, calibration=own)


def evaluate(
    plan: Plan, variant: PlannedVariant, quantized: Quantized, baseline: Baseline, isolate: bool = True
) -> VariantResult:
    """Evaluate one variant under the same protocol as the baseline, with KL from the baseline's log-probabilities."""
    bnb = variant if isinstance(variant, BnbVariant) else None
    path = quantized.record.path if quantized.record else plan.model.path
    subject = Subject(name=variant.name, model_path=path, bnb=bnb, kv_cache=runtime_kv(plan, variant) or "bf16")
    with progress.stage(f"evaluate {variant.name}") as shown:
        evaluation, step = evaluate_subject_once(
            plan, variant_eval_key(plan, variant, quantized), subject, baseline.key, isolate
        )
        shown.outcome = outcome(step, f"perplexity {evaluation.perplexity:.3f}")
    measured = quantized.sensitivity.step if quantized.sensitivity else None
    calibrated = quantized.calibration.step if quantized.calibration else None
    steps = [s for s in (calibrated, measured, quantized.step, step) if s is not None]
    return VariantResult(
        name=variant.name,
        method=variant.method,
        quantize=quantized.record,
        evaluation=evaluation,
        artifact=quantized.record.path if quantized.record else None,
        steps=steps,
        sensitivity=quantized.sensitivity.record if quantized.sensitivity else None,
        calibration=calibration_used(plan, variant, quantized),
    )


def calibration_used(plan: Plan, variant: Variant, quantized: Quantized) -> CalibrationUse | None:
    """Which calibration data the variant was built on (None when it reads none), for the report's comparison."""
    if not needs_calibration(variant):
        return None
    choice = getattr(variant, "calibration", None)
    spec = calibration_spec(plan, choice)
    label = (
        choice.label() if choice else CalibrationChoice(source=spec.source, chat_template=spec.chat_template).label()
    )
    record = quantized.calibration.record if quantized.calibration else None
    return CalibrationUse(
        source=spec.source,
        chat_template=spec.chat_template,
        label=label,
        own=choice is not None,
        samples=record.samples if record else None,
        tokens=record.tokens if record else None,
    )


def evaluate_subject_once(
    plan: Plan, key: str, subject: Subject, baseline: str | None, isolate: bool = True
) -> tuple[EvalRecord, StepRun]:
    """Evaluate any subject under the plan's protocol (cached under ``key``), with KL from the baseline stored under
    ``baseline``."""
    spec = plan.spec
    logprobs = (
        str(plan.cache.folder("evaluate", baseline) / BASELINE_LOGPROBS)
        if baseline and spec.evaluation.kl_tokens
        else None
    )
    evaluation, step = cached(
        plan.cache,
        "evaluate",
        subject.name,
        key,
        EvalRecord,
        evaluate_subject,
        spec.step_timeout_s,
        isolate,
        subject=subject,
        protocol=Protocol(calibration=spec.calibration, evaluation=spec.evaluation),
        resources=plan.resources,
        baseline=logprobs,
    )
    return evaluation.model_copy(update={"variant": subject.name}), step


def model_type(plan: Plan) -> str:
    """The model's architecture family as transformers names it (``qwen3_moe``), for messages."""
    config = Path(plan.model.path) / "config.json"
    return json.loads(config.read_text()).get("model_type", "unknown") if config.is_file() else "unknown"


def failure(plan: Plan, variant: PlannedVariant, stage: str, error: Exception) -> FailedVariant:
    """A variant's failure as a report row: what was tried on which model type, and the error's own words."""
    if isinstance(error, QuantflowError):
        reason = f"{error.problem} (fix: {error.fix})"
    else:
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    return FailedVariant(
        name=variant.name,
        method=variant.method,
        stage=stage,
        error=f"method {variant.method} could not {stage} this {model_type(plan)} model: {reason}",
    )


def build_variant(
    plan: Plan, variant: PlannedVariant, calibration: CalibrationRecord, baseline: Baseline
) -> VariantResult | FailedVariant:
    """Quantize then evaluate one variant; a failure of either is returned as its report row, not raised, so the
    variants that finish still reach the report."""
    stage = "quantize"
    try:
        quantized = quantize(plan, variant, calibration)
        stage = "evaluate"
        return evaluate(plan, variant, quantized, baseline)
    except Exception as error:  # any failure of one variant: the run goes on and reports it
        return failure(plan, variant, stage, error)


class Gathered(BaseModel):
    calibration: Calibrated
    baseline: Baseline
    variants: list[VariantResult]


def gather(plan: Plan) -> Gathered:
    """A finished run's records, read from the cache by their keys alone: nothing is computed (fan-out's parent)."""
    reader = plan.model_copy(update={"gather_only": True})
    calibration = calibrate(reader)
    baseline = evaluate_baseline(reader)
    variants = [evaluate(reader, v, quantize(reader, v, calibration.record), baseline) for v in plan.variants]
    return Gathered(calibration=calibration, baseline=baseline, variants=variants)
