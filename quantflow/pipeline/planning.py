"""Plan a run: every check that can fail before heavy work, so bad input costs seconds, not a GPU hour."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.evaluation.fp4 import fp4_kernel_missing
from quantflow.evaluation.fp8 import fp8_matmuls, fp8_matmuls_missing
from quantflow.evaluation.int4 import GROUP_SIZES
from quantflow.infra.cache import StepCache, content_key, default_cache_root
from quantflow.infra.progress import stage
from quantflow.infra.resources import Resources, check_fits, pick_device
from quantflow.inputs.corpus import check_source
from quantflow.inputs.sources import ModelRef, resolve_model
from quantflow.quantization.kv_cache import check_attention, twin_name
from quantflow.quantization.mixed import check_budget, rule_order
from quantflow.quantization.moe import check_experts, routers_kept
from quantflow.quantization.quantize import (
    Scheme,
    WeightVariant,
    check_ignore,
    resolve_group_size,
    scheme_label,
    weightless_model,
)
from quantflow.quantization.targets import mixed_groups
from quantflow.spec import (
    BnbVariant,
    FP8Variant,
    KVCacheVariant,
    MixedVariant,
    PlannedVariant,
    RunSpec,
    Variant,
    with_output_folder,
)
from quantflow.sweep import Dropped, expand

# AWQ's grid search runs thousands of small forwards: at one sample each they are launch-bound
GPU_CALIBRATION_BATCH = 16
BASELINE = "baseline"
SHAPES_VERSION = 3  # bump when the shape checks change what they accept

Progress = Callable[[str], None]


class Plan(BaseModel):
    """A validated run: the spec, the resolved model, the device and each weight variant's scheme."""

    spec: RunSpec
    model: ModelRef
    device: str
    cache_root: str
    schemes: dict[str, Scheme]
    variants: list[PlannedVariant]
    dropped: list[Dropped] = []
    kv: dict[str, str] = {}  # the kv_cache axis's twins by name: their KV-cache option (others keep bf16)
    gather_only: bool = False

    def variant(self, name: str) -> PlannedVariant:
        """A planned variant by name (a fanned-out branch gets only the name)."""
        found = [v for v in self.variants if v.name == name]
        if not found:
            raise QuantflowError(
                f"variant '{name}' is not in the plan (it has {', '.join(v.name for v in self.variants)})",
                "pick a variant name from the spec or its sweep",
            )
        return found[0]

    @property
    def cache(self) -> StepCache:
        return StepCache(Path(self.cache_root), read_only=self.gather_only)

    @property
    def resources(self) -> Resources:
        spec = self.spec
        return Resources(
            device=self.device,
            dtype=spec.model.dtype,
            gpu_memory_gb=spec.gpu_memory_gb,
            timeout_s=spec.step_timeout_s,
            compile_cache=str(Path(self.cache_root) / "inductor"),
            calibration_batch=spec.calibration_batch_size or (GPU_CALIBRATION_BATCH if self.device == "cuda" else 1),
        )


def check_environment(spec: RunSpec) -> None:
    """Refuse variants this machine cannot run, before anything is loaded."""
    from quantflow.infra.environment import package_version

    candidates = [*spec.variants, *expand(spec)[0]]
    bnb = [v.name for v in candidates if isinstance(v, BnbVariant)]
    if bnb and package_version("bitsandbytes") is None:
        raise QuantflowError(
            f"variants {', '.join(bnb)} need bitsandbytes, which is not installed",
            "pip install 'quantflow[bnb]' or drop those variants",
        )
    if any(v.method == "autoround" for v in candidates) and package_version("auto-round") is None:
        raise QuantflowError("autoround variants need the auto-round package", "pip install auto-round")
    if spec.evaluation.lm_eval:
        from quantflow.evaluation.lm_eval_tasks import check_tasks

        check_tasks(spec.evaluation.lm_eval)


def check_kernels(kernels: str, variant: WeightVariant, scheme: Scheme, device: str) -> None:
    """Kernels demanded by name must exist for the variant and on this machine."""
    if kernels == "int4" and (getattr(variant, "bits", 8) != 4 or scheme.group_size not in GROUP_SIZES):
        raise QuantflowError(
            f"variant '{variant.name}' ({scheme_label(variant, scheme.group_size)}) cannot run on the int4 kernels, "
            f"which need 4 bits in groups of {GROUP_SIZES}",
            "set evaluation.kernels to 'auto' or 'dense', or change the variant",
        )
    if kernels == "fp8" and not isinstance(variant, FP8Variant):
        raise QuantflowError(
            f"variant '{variant.name}' ({scheme_label(variant, scheme.group_size)}) cannot run on FP8 matmuls",
            "set evaluation.kernels to 'auto' or 'dense', or keep only fp8 variants",
        )
    if kernels == "fp4" and (problem := fp4_kernel_missing(device)) is not None:
        raise QuantflowError(
            f"evaluation.kernels 'fp4' needs quantflow's FP4 kernel, which this machine cannot run ({problem})",
            "run on a CUDA GPU of compute capability 8.0 or newer, or set evaluation.kernels to 'auto'",
        )
    if kernels == "fp8" and not fp8_matmuls(device):
        raise QuantflowError(
            f"evaluation.kernels 'fp8' needs FP8 matmuls, which this machine lacks ({fp8_matmuls_missing(device)})",
            "run on a GPU of compute capability 8.9 or newer (Ada, Hopper), or set evaluation.kernels to 'auto'",
        )


def check_folder(field: str, folder: Path) -> None:
    """A folder the run will write must be a folder, or creatable: found now, not after an hour of GPU work."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise QuantflowError(f"{field} {folder} cannot be a folder: {existing} is a file", f"point {field} at a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise QuantflowError(
            f"{field} {folder} is not writable ({existing} is read-only for this user)",
            f"point {field} at a writable folder",
        )


def check_calibration_choices(spec: RunSpec) -> None:
    """Each variant's own calibration source and each source of the sweep's axis, checked like the run's own."""
    for variant in spec.variants:
        if getattr(variant, "calibration", None) is not None:
            check_source(f"variant {variant.name or variant.method}: calibration.source", variant.calibration.source)
    for choice in spec.sweep.calibrations if spec.sweep else []:
        check_source("sweep.calibrations", choice.source)


def plan(spec: RunSpec, progress: Progress = print) -> Plan:
    """Validate the spec against this machine and the model's shapes; resolve the model source."""
    spec = with_output_folder(spec, datetime.now())
    with stage("plan") as shown:
        planned = _plan(spec, progress)
        shown.outcome = f"{len(planned.variants)} variants on {planned.device}"
    return planned


def _plan(spec: RunSpec, progress: Progress) -> Plan:
    device = pick_device(spec.device)
    check_environment(spec)
    cache = StepCache(spec.output.cache_dir or default_cache_root())
    check_folder("output.dir", Path(spec.output.dir))
    check_folder("output.cache_dir", cache.root)
    check_source("calibration.source", spec.calibration.source)
    check_source("evaluation.corpus", spec.evaluation.corpus)
    check_calibration_choices(spec)
    if spec.output.store:
        from quantflow.delivery.store import check_access

        check_access(spec.output.store)
    progress(f"model: resolving {spec.model.source}")
    model = resolve_model(spec.model, cache)
    if device == "cuda":
        import psutil
        import torch

        from quantflow.evaluation.evaluate import folder_size

        check_fits(
            folder_size(Path(model.path)),
            spec.gpu_memory_gb,
            torch.cuda.device_count(),
            psutil.virtual_memory().available,
        )
    swept, dropped = expand(spec)
    twins, kv, unpaired = kv_twins(spec, [*spec.variants, *swept])
    checked = [*spec.variants, *swept, *(twin for twin, _ in twins)]
    key = shapes_key(model, checked, spec.model.trust_remote_code, kv)
    shapes = cache.lookup("plan", key, Shapes) or check_shapes(model, checked, spec.model.trust_remote_code, kv)
    schemes, kept, asked_twins = fit_all(spec, shapes, swept, twins, dropped, device)
    if spec.sweep is not None and not spec.variants and not kept:
        reasons = "; ".join(f"{d.name}: {d.reason}" for d in dropped[:5])
        raise QuantflowError(f"no combination of the sweep fits this model ({reasons})", "widen or change the grid")
    if not cache.read_only:  # only now: a refused plan writes nothing
        with cache.writing("plan", key) as folder:
            cache.save(folder, shapes)
    return Plan(
        spec=spec,
        model=model,
        device=device,
        cache_root=str(cache.root),
        schemes={name: scheme for name, scheme in schemes.items() if scheme is not None},
        variants=[*spec.variants, *kept, *asked_twins],
        dropped=dropped + unpaired,
        kv={name: option for name, option in kv.items() if name in schemes},
    )


def fit_all(
    spec: RunSpec,
    shapes: Shapes,
    swept: list[Variant],
    twins: list[tuple[PlannedVariant, str]],
    dropped: list[Dropped],
    device: str,
) -> tuple[dict[str, Scheme | None], list[PlannedVariant], list[PlannedVariant]]:
    """Each variant's scheme: the spec's variants and the twins of them and of the baseline must fit, or the plan is
    refused (the baseline's twins first, so a KV-cache misfit names the axis); a sweep's combinations and their twins
    that do not fit are added to ``dropped``. Returns the schemes, the sweep's kept variants and twins, and the
    spec's twins."""
    swept_names = {variant.name for variant in swept}
    asked_twins = [twin for twin, base in twins if base not in swept_names]
    first = [twin for twin in asked_twins if isinstance(twin, KVCacheVariant)]
    asked = [*first, *spec.variants, *(twin for twin in asked_twins if not isinstance(twin, KVCacheVariant))]
    schemes = {variant.name: fitted(shapes.fitted[variant.name], variant, spec, device) for variant in asked}
    kept = []
    bases = {twin.name: base for twin, base in twins}
    for variant in [*swept, *(twin for twin, base in twins if base in swept_names)]:  # bases before their twins
        if variant.name in bases and bases[variant.name] not in schemes:
            continue  # its weight variant was left out: so is the twin
        try:
            schemes[variant.name] = fitted(shapes.fitted[variant.name], variant, spec, device)
            kept.append(variant)
        except QuantflowError as error:
            dropped.append(Dropped(name=variant.name, reason=error.problem))
    return schemes, kept, asked_twins


class Fitted(BaseModel):
    """A variant against the model's shapes: its scheme, or why it does not fit (with the fix)."""

    scheme: Scheme | None = None
    problem: str | None = None
    fix: str | None = None


class Shapes(BaseModel):
    """The shape checks of one set of variants on one model, by variant name."""

    fitted: dict[str, Fitted]


def kv_twins(spec: RunSpec, variants: list[Variant]) -> tuple[list[tuple[PlannedVariant, str]], dict[str, str], list]:
    """The kv_cache axis as variants: for each quantized KV option, a twin of the baseline (its bf16 weights with
    only the KV-cache scheme) and of every weight variant (its recipe with the KV-cache scheme on top, so the
    artifact carries the k/v scales vLLM reads); each twin with the weight variant it pairs with. A load-time
    (bitsandbytes) variant has no artifact to carry the scales: its twin is left out, and says why."""
    twins, kv, unpaired = [], {}, []
    taken = {variant.name for variant in variants}
    for option in (o for o in spec.evaluation.kv_cache if o != "bf16"):
        pairs = [(KVCacheVariant(name=twin_name(BASELINE, option)), BASELINE)]
        for variant in variants:
            name = twin_name(variant.name, option)
            if isinstance(variant, BnbVariant):
                reason = "bitsandbytes quantizes at load time: no artifact to carry the KV-cache scales"
                unpaired.append(Dropped(name=name, reason=reason))
            else:
                pairs.append((variant.model_copy(update={"name": name}), variant.name))
        for twin, base in pairs:
            if twin.name in taken:
                raise QuantflowError(
                    f"variant name '{twin.name}' is taken by the kv_cache axis's twin of '{base}'",
                    "rename that variant",
                )
            twins.append((twin, base))
            kv[twin.name] = option
    return twins, kv, unpaired


def shapes_key(model: ModelRef, variants: list[PlannedVariant], trust_remote_code: bool, kv: dict[str, str]) -> str:
    """The shape checks' cache key: the weights' fingerprint and the variants, nothing about this machine.

    The checks need the model's module tree, and building it imports transformers' model code:
    most of a re-run's planning time (about 7 s on a GPU host). Their result depends only on the
    model and the variants, so an unchanged re-run reads it back; the checks against this machine
    (kernels, memory) run every time.
    """
    specs = [v.model_dump(mode="json") for v in variants]
    return content_key("shapes", SHAPES_VERSION, model.fingerprint, trust_remote_code, specs, kv)


def check_shapes(
    model: ModelRef, variants: list[PlannedVariant], trust_remote_code: bool, kv: dict[str, str]
) -> Shapes:
    skeleton = weightless_model(model.path, trust_remote_code)
    kind = getattr(skeleton.config, "model_type", "unknown")
    return Shapes(fitted={v.name: fit_shapes(skeleton, v, kv.get(v.name, "bf16"), kind) for v in variants})


def fit_shapes(skeleton, variant: PlannedVariant, kv_cache: str = "bf16", model_type: str = "") -> Fitted:
    """The variant's scheme against the layer shapes (none for load-time variants), or the reason it cannot fit."""
    if isinstance(variant, BnbVariant):
        return Fitted()
    variant = routers_kept(variant, skeleton)
    try:
        if kv_cache != "bf16":
            check_attention(skeleton, kv_cache, model_type)
        if isinstance(variant, KVCacheVariant):
            return Fitted(scheme=Scheme(group_size=None))
        check_experts(skeleton, variant.name, variant.method)
        check_ignore(skeleton, variant)
        scheme = resolve_group_size(skeleton, variant)
        if isinstance(variant, MixedVariant):
            groups = mixed_groups(skeleton, variant, scheme.group_size)
            check_budget(groups, variant.target_bits, variant.name)
            if variant.allocation == "rule":
                rule_order(groups, variant.name)
    except QuantflowError as error:
        return Fitted(problem=error.problem, fix=error.fix)
    return Fitted(scheme=scheme)


def fitted(shapes: Fitted, variant: PlannedVariant, spec: RunSpec, device: str) -> Scheme | None:
    """The variant's scheme against the model's shapes and this machine (None for load-time variants), or why not."""
    if shapes.problem is not None:
        raise QuantflowError(shapes.problem, shapes.fix or "")
    if isinstance(variant, BnbVariant):
        return None
    if isinstance(variant, KVCacheVariant):  # the baseline's weights: no weight kernels to check
        return shapes.scheme
    check_kernels(spec.evaluation.kernels, variant, shapes.scheme, device)
    return shapes.scheme
