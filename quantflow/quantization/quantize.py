"""Quantization with llm-compressor (RTN, GPTQ, AWQ, AWQ+GPTQ, AutoRound, FP8, INT8 W8A8) and bitsandbytes configs.

The recipes are built from our variant specs; llm-compressor does the maths and writes
compressed-tensors checkpoints that vLLM serves. Scheme problems (a group size that does
not divide a layer's width) are found on a weightless copy of the model before any
calibration starts, so they cost a second rather than a failed hour.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.evaluation.expert_load import checkpoint_expert_names
from quantflow.infra import progress
from quantflow.infra.resources import (
    Resources,
    cap_gpu_memory,
    over_budget,
    peak_memory_mb,
    reset_peak_memory,
    visible_devices,
)
from quantflow.inputs.calibration import CalibrationRecord, load_samples
from quantflow.quantization.kv_cache import KV_LABELS, with_kv_cache
from quantflow.quantization.moe import RoutingRecord, counted_routing, routers_kept, unfuse, unfuse_weightless
from quantflow.quantization.sensitivity import SensitivityRecord
from quantflow.quantization.targets import input_embedding, target_layers
from quantflow.spec import (
    FINER,
    FP4_GROUP,
    AutoRoundVariant,
    AWQGPTQVariant,
    AWQVariant,
    BnbVariant,
    FP4Variant,
    FP8Variant,
    GPTQVariant,
    Int8Variant,
    KVCacheVariant,
    MixedVariant,
    RTNVariant,
    needs_calibration,
)

WeightVariant = (
    RTNVariant
    | GPTQVariant
    | AWQVariant
    | AWQGPTQVariant
    | AutoRoundVariant
    | MixedVariant
    | FP8Variant
    | Int8Variant
    | FP4Variant
    | KVCacheVariant
)
GROUPED = (RTNVariant, GPTQVariant, AWQVariant, AWQGPTQVariant, AutoRoundVariant, MixedVariant)
AUTO_GROUP_SIZES = (128, 64, 32)


class Scheme(BaseModel):
    """A variant's group size as resolved against the model's shapes, and how it was chosen (for 'auto')."""

    group_size: int | None
    note: str | None = None


class Smoothing(BaseModel):
    """What an AWQ-family recipe smoothed: each resolved mapping, and the quantized layers no mapping balanced."""

    mappings: list[dict[str, str | list[str]]]
    unsmoothed: list[str]


class QuantizeRecord(BaseModel):
    """Result of one quantization step: where the artifact is and what was done to it."""

    variant: str
    method: str
    path: str
    seconds: float
    peak_memory_mb: float
    memory_kind: str
    group_size: int | None
    group_size_note: str | None
    quantized_layers: list[str]
    skipped_layers: list[str]
    recipe: str
    visible_devices: str | None = None
    scheme: str = ""
    smoothing: Smoothing | None = None
    precision: dict[str, str] = {}  # mixed variants: each quantized Linear's menu option ('w4', 'w8', 'bf16')
    allocated_bits: float | None = None  # mixed variants: the allocation's effective bits per weight
    routing: RoutingRecord | None = None  # mixtures of experts: calibration tokens routed to each expert


def weightless_model(model_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree on the meta device: shapes without loading a byte of weights; a mixture of experts
    with its experts unfused into Linears, as llm-compressor will quantize them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return unfuse_weightless(model)


def resolve_group_size(model: torch.nn.Module, variant: WeightVariant) -> Scheme:
    """Check the group size against every targeted layer; resolve 'auto' by the documented rule.

    Rule for 'auto' (the default, so a default run fits any model): the largest of 128, 64, 32
    that divides the input width of every quantized layer, else per output channel. An
    explicit size that does not divide some width fails here, naming the layers and the sizes
    that would work: a user who chose a size gets it or an error, never a silent substitute.
    """
    if isinstance(variant, FP4Variant):
        return fp4_groups(model, variant)
    if not isinstance(variant, GROUPED) or variant.group_size is None:
        return Scheme(group_size=None)
    quantized, _ = target_layers(model, variant.ignore)
    widths = {name: model.get_submodule(name).in_features for name in quantized}
    if variant.group_size == "auto":
        for size in AUTO_GROUP_SIZES:
            if all(width % size == 0 for width in widths.values()):
                return Scheme(
                    group_size=size,
                    note=f"group_size auto -> {size} (largest of 128/64/32 dividing all {len(widths)} layer widths)",
                )
        return Scheme(
            group_size=None,
            note="group_size auto -> per output channel (no size in 128/64/32 divides every width: "
            f"{sorted(set(widths.values()))})",
        )
    bad = {name: width for name, width in widths.items() if width % variant.group_size}
    if bad and isinstance(
        variant, MixedVariant
    ):  # those layers cannot take w4: the allocation gives them another option
        return Scheme(
            group_size=variant.group_size,
            note=f"w4 at group {variant.group_size} dropped for {len(bad)} layers whose width it does not divide",
        )
    if bad:
        valid = [s for s in (256, 128, 64, 32, 16, 8) if all(w % s == 0 for w in widths.values())]
        shown = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        raise QuantflowError(
            f"variant '{variant.name}': group_size {variant.group_size} does not divide the input width of "
            f"{len(bad)} layers: {shown}",
            f"use group_size {' or '.join(map(str, valid)) or 'null'} (or 'auto'), or add those layers to ignore",
        )
    return Scheme(group_size=variant.group_size)


def fp4_preset(variant: FP4Variant) -> str:
    """llm-compressor's preset name: NVFP4A16, NVFP4, MXFP4A16 or MXFP4."""
    return variant.method.upper() + ("A16" if variant.activations == "a16" else "")


def fp4_label(variant: FP4Variant) -> str:
    scales = "FP8 e4m3 scales and a per-tensor global scale" if variant.method == "nvfp4" else "E8M0 scales"
    group = FP4_GROUP[variant.method]
    acts = "bf16 activations" if variant.activations == "a16" else "FP4 activations"
    rounding = ", GPTQ-rounded" if variant.algorithm == "gptq" else ""
    return (
        f"{variant.method.upper()} W4A{16 if variant.activations == 'a16' else 4}: FP4 E2M1 weights in groups of "
        + (f"{group} with {scales}{rounding}, {acts}")
    )


def fp4_groups(model: torch.nn.Module, variant: FP4Variant) -> Scheme:
    """The FP4 formats fix their group size (16 or 32): every quantized layer's input width must be a multiple."""
    group = FP4_GROUP[variant.method]
    quantized, _ = target_layers(model, variant.ignore)
    bad = {n: model.get_submodule(n).in_features for n in quantized if model.get_submodule(n).in_features % group}
    if bad:
        shown = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:5])
        raise QuantflowError(
            f"variant '{variant.name}' ({variant.method}) needs input widths that are multiples of {group}; "
            f"{len(bad)} layers are not: {shown}",
            "add those layers to the variant's ignore list, or use an integer method with a group size that fits",
        )
    return Scheme(group_size=group)


def check_ignore(model: torch.nn.Module, variant: WeightVariant) -> None:
    """Tied lm_head shares the embedding matrix, and embeddings are never quantized."""
    quantized, _ = target_layers(model, variant.ignore)
    if getattr(model.config, "tie_word_embeddings", False) and any(name.endswith("lm_head") for name in quantized):
        raise QuantflowError(
            f"variant '{variant.name}' would quantize lm_head, which is tied to the input embeddings here",
            "keep 'lm_head' in the variant's ignore list",
        )
    if not quantized:
        raise QuantflowError(
            f"variant '{variant.name}' quantizes no layer (ignore matches every Linear)", "shorten the ignore list"
        )


def scheme_for(variant: WeightVariant, group_size: int | None, scale_dtype: str = "bfloat16"):
    """The compressed-tensors scheme of a variant: llm-compressor's presets for FP8 and INT8 W8A8, else integer
    weights at the variant's bits, group size and symmetry (activations untouched: W4A16, W8A16)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if isinstance(variant, FP8Variant):
        return preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    if isinstance(variant, Int8Variant):
        return preset_name_to_scheme("W8A8", ["Linear"])
    if isinstance(variant, FP4Variant):
        return preset_name_to_scheme(fp4_preset(variant), ["Linear"])
    weights = QuantizationArgs(
        num_bits=variant.bits,
        type="int",
        symmetric=variant.symmetric,
        dynamic=False,
        strategy="group" if group_size else "channel",
        group_size=group_size,
        scale_dtype=getattr(torch, scale_dtype),
        observer=variant.observer,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


def scheme_label(variant: WeightVariant, group_size: int | None, precision: dict[str, str] | None = None) -> str:
    """The scheme in the words serving engines use, for reports and model cards."""
    if isinstance(variant, KVCacheVariant):
        return "weights unquantized"
    if isinstance(variant, MixedVariant):
        from quantflow.quantization.mixed import finer_group, option_counts

        counts = option_counts(precision or {})
        grouping = f"group {group_size}" if group_size else "per-channel"
        six = f"{counts['w6']} W6A16 int per-channel (embedding table), " if counts["w6"] else ""
        finer = "".join(f"{counts[o]} W4A16 int group {finer_group(o)}, " for o in FINER if counts[o])
        return (
            f"mixed, {'symmetric' if variant.symmetric else 'asymmetric'}{scales_note(variant)}: {counts['w4']} "
            f"Linears W4A16 int {grouping}, {finer}{six}{counts['w8']} W8A16 int per-channel, {counts['bf16']} kept "
            "in bf16"
        )
    if isinstance(variant, FP8Variant):
        rounding = ", GPTQ-rounded" if variant.algorithm == "gptq" else ""
        return f"W8A8 FP8 e4m3 (per-channel weights{rounding}, dynamic per-token activations)"
    if isinstance(variant, Int8Variant):
        return "W8A8 INT8 (per-channel weights, dynamic per-token activations)"
    if isinstance(variant, FP4Variant):
        return fp4_label(variant)
    grouping = f"group {group_size}" if group_size else "per-channel"
    kind = "symmetric" if variant.symmetric else "asymmetric"
    return f"W{variant.bits}A16 int, {kind}, {grouping}{scales_note(variant)}"


SCALES = {"minmax": "", "mse": ", MSE-clipped scales", "imatrix_mse": ", activation-weighted MSE-clipped scales"}


def scales_note(variant: WeightVariant) -> str:
    """How the integer scales were chosen, where not by the plain range: two rows of the same scheme can differ by
    this alone (AutoRound learns its own clipping, so its observer is not named)."""
    return "" if isinstance(variant, AutoRoundVariant) else SCALES[variant.observer]


def recipe_for(variant: WeightVariant, group_size: int | None, scale_dtype: str = "bfloat16") -> list:
    """llm-compressor modifiers for a variant, in the order they run."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if isinstance(variant, KVCacheVariant):
        return []  # the KV-cache scheme alone (with_kv_cache)
    groups = {"group_0": scheme_for(variant, group_size, scale_dtype)}
    gptq_settings = {"config_groups": groups, "ignore": variant.ignore}
    if isinstance(variant, FP8Variant | Int8Variant | GPTQVariant | FP4Variant):
        gptq_settings.update(block_size=variant.block_size, dampening_frac=variant.dampening_frac)
    if isinstance(variant, FP8Variant | FP4Variant) and variant.algorithm == "gptq":
        return [GPTQModifier(**gptq_settings)]
    if isinstance(variant, Int8Variant):
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        smoothing = SmoothQuantModifier(smoothing_strength=variant.smoothing_strength)
        return [smoothing, GPTQModifier(**gptq_settings)]
    if isinstance(variant, AutoRoundVariant):
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        return [
            AutoRoundModifier(
                config_groups=groups,
                ignore=variant.ignore,
                iters=variant.iters,
                batch_size=variant.batch_size,
                lr=variant.lr,
                enable_torch_compile=False,  # compiling each block costs more than it saves at these sizes
            )
        ]
    if isinstance(variant, GPTQVariant):  # plain GPTQ, or AWQ smoothing first
        gptq = GPTQModifier(**gptq_settings, actorder=variant.actorder)
        return [awq_modifier(variant), gptq] if isinstance(variant, AWQGPTQVariant) else [gptq]
    quantizer = QuantizationModifier(config_groups=groups, ignore=variant.ignore)
    return [awq_modifier(variant), quantizer] if isinstance(variant, AWQVariant) else [quantizer]


def mixed_recipe(
    variant: MixedVariant,
    precision: dict[str, str],
    group_size: int | None,
    scale_dtype: str = "bfloat16",
    embedding: str | None = None,
) -> list:
    """One config group per chosen option, targeting its layers by exact name; bf16 layers join ``ignore``.

    A quantized input embedding (``embedding``, its module name) gets its own round-to-nearest modifier first: GPTQ
    does not touch Embedding modules, and llm-compressor 0.14 writes one it targets with scales never observed (the
    saved table measured 99.5% relative error). lm_head, an Embedding's tied twin or not, stays with the final pass."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    from quantflow.quantization.mixed import OPTIONS
    from quantflow.quantization.sensitivity import weight_args

    def schemes(chosen: dict[str, str]) -> dict:
        found = {}
        for option in (o for o in OPTIONS if o != "bf16"):
            if names := [name for name, taken in chosen.items() if taken == option]:
                args = weight_args(option, group_size, variant.symmetric, variant.observer, getattr(torch, scale_dtype))
                found[option] = QuantizationScheme(targets=names, weights=args)
        return found

    rounded = []
    if precision.get(embedding, "bf16") != "bf16":
        table = schemes({embedding: precision[embedding]})
        for scheme in table.values():
            # compressed-tensors 0.19 infers a module's format by its exact type (``module_type in
            # COMPRESSIBLE_MODULE_TYPES``, from vllm-project/compressed-tensors#718), so an
            # Embedding subclass (Gemma 3's scaled one) was saved dense, its bf16 weights beside their scales; named
            # here, it is packed like the Linears (test_a_scaled_embedding_subclass_is_packed_not_stored_dense)
            scheme.format = "pack-quantized"
        rounded = [QuantizationModifier(config_groups=table)]
    groups = schemes({name: taken for name, taken in precision.items() if name != embedding})
    quantized = {name for name, taken in precision.items() if taken != "bf16"}
    ignore = [
        *(name for name in variant.ignore if name not in quantized),
        *(name for name, taken in precision.items() if taken == "bf16" and name not in variant.ignore),
    ]
    if variant.algorithm == "awq":
        return [*rounded, awq_modifier(variant), QuantizationModifier(config_groups=groups, ignore=ignore)]
    gptq = GPTQModifier(
        config_groups=groups,
        ignore=ignore,
        block_size=variant.block_size,
        dampening_frac=variant.dampening_frac,
        actorder=variant.actorder,
    )
    return [*rounded, gptq]


def awq_modifier(variant: AWQVariant | AWQGPTQVariant | MixedVariant):
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return AWQModifier(n_grid=variant.n_grid, duo_scaling=variant.duo_scaling)


@contextlib.contextmanager
def recorded_smoothing(found: list[dict]) -> Iterator[None]:
    """Collect the smoothing mappings AWQ resolves against the model.

    llm-compressor resolves them at calibration start and clears them at finalize, logging skipped ones only at
    debug level; a report that explains a weak AWQ row needs them, so the resolver is wrapped for the run.
    """
    from llmcompressor.modifiers.transform.awq import AWQModifier

    original = AWQModifier._set_resolved_mappings

    def resolve(self, model) -> None:
        original(self, model)
        found.extend({"smooth": m.smooth_name, "balance": list(m.balance_names)} for m in self._resolved_mappings)

    AWQModifier._set_resolved_mappings = resolve
    try:
        yield
    finally:
        AWQModifier._set_resolved_mappings = original


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module, ignore: list[str]) -> Iterator[None]:
    """Report quantized Linears as llm-compressor's sequential pipeline finishes each subgraph (a decoder layer).

    The pipeline announces a finished subgraph through ``LifecycleCallbacks.sequential_epoch_end(modules)``, after
    which GPTQ and AWQ have quantized those modules; the call is wrapped for the run to count them. A data-free recipe
    (RTN) has no subgraphs: all layers count at once when it ends.
    """
    from llmcompressor.core.session_functions import LifecycleCallbacks

    names = {id(model.get_submodule(name)): name for name in target_layers(model, ignore)[0]}
    done: set[str] = set()
    original = LifecycleCallbacks.__dict__["sequential_epoch_end"]

    def counted(cls, modules, **kwargs):
        result = original.__func__(cls, modules, **kwargs)
        done.update(names[id(m)] for m in modules if id(m) in names)
        progress.advance(len(done), len(names), "layers")
        return result

    progress.advance(0, len(names), "layers")
    LifecycleCallbacks.sequential_epoch_end = classmethod(counted)
    try:
        yield
    finally:
        LifecycleCallbacks.sequential_epoch_end = original
    progress.advance(len(names), len(names), "layers")


@contextlib.contextmanager
def cpu_safe_awq() -> Iterator[None]:
    """Let llm-compressor's AWQ run without an accelerator.

    AWQ pins its cached activations (``IntermediatesCache.pin_memory``) to speed up
    host-to-device copies; pinning needs an accelerator runtime and raises on CPU-only
    machines. With no accelerator there is no copy to speed up, so pinning is skipped.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def calibration_dataset(record: CalibrationRecord):
    from datasets import Dataset

    samples = load_samples(record)
    return Dataset.from_dict(
        {"input_ids": [s.tolist() for s in samples], "attention_mask": [[1] * len(s) for s in samples]}
    )


def equal_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of at most ``batch_size`` samples that all have the same length, longest first.

    llm-compressor batches by sorting lengths and truncating each batch to its shortest sample (or
    padding it, and GPTQ would then fit padding), which changes the statistics with the batch size.
    Batching only equal lengths keeps every token and no padding: GPTQ's Hessian, AWQ's means and
    losses are the same sums as one sample at a time, computed in fewer, larger forward passes.
    """
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    return [
        indices[start : start + batch_size]
        for length, indices in sorted(by_length.items(), reverse=True)
        for start in range(0, len(indices), batch_size)
    ]


def calibration_batch(variant: WeightVariant, resources: Resources) -> int:
    """Samples per calibration forward pass. AutoRound's gets one: llm-compressor hands AutoRound each captured
    layer input to batch itself (``batch_size``), and auto-round 0.15 exits the process on a capture that is already
    wider than its batch, as the GPU's default batch of 16 is."""
    return 1 if isinstance(variant, AutoRoundVariant) else resources.calibration_batch


def calibration_data(record: CalibrationRecord, batch_size: int) -> dict:
    """oneshot's calibration arguments: the samples one at a time, or as a loader of equal-length batches."""
    if batch_size == 1:
        return {
            "dataset": calibration_dataset(record),
            "num_calibration_samples": record.samples,
            "max_seq_length": record.max_len,
        }
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    dataset = calibration_dataset(record)
    batches = equal_length_batches([len(ids) for ids in dataset["input_ids"]], batch_size)
    return {"dataset": DataLoader(dataset, batch_sampler=batches, collate_fn=default_data_collator)}


def quantize_weights(
    model_path: str,
    variant: WeightVariant,
    scheme: Scheme,
    calibration: CalibrationRecord | None,
    resources: Resources,
    out: Path,
    final: Path,
    sensitivity: SensitivityRecord | None = None,
    kv_cache: str = "bf16",
) -> QuantizeRecord:
    """Run one llm-compressor recipe and save the compressed checkpoint (weights in ``dtype``) into ``out``; with a
    quantized ``kv_cache``, the recipe calibrates the k/v scales too and the checkpoint carries them.

    The model is loaded into host memory; llm-compressor's sequential pipeline onloads one
    decoder layer at a time to the GPU, so the GPU holds a layer, its calibration activations
    and its GPTQ Hessians, never the whole model: ``gpu_memory_gb`` caps that.

    On CPU the calibration forward passes run in float32: CPUs without bf16 matrix units run
    bf16 matmuls an order of magnitude slower. Scales are kept in ``dtype`` throughout and
    the model is cast back to ``dtype`` before saving, so the artifact matches a GPU run's.
    """
    import yaml
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, budget = resources.dtype, resources.gpu_memory_gb
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, resources.compute_dtype), use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    variant = routers_kept(variant, model)
    precision, allocated = allocation(variant, sensitivity)
    if isinstance(variant, MixedVariant):
        recipe = mixed_recipe(variant, precision, scheme.group_size, dtype, input_embedding(model))
    else:
        recipe = recipe_for(variant, scheme.group_size, dtype)
    recipe = with_kv_cache(recipe, kv_cache)
    calibrated = needs_calibration(variant) or kv_cache != "bf16"
    data = calibration_data(calibration, calibration_batch(variant, resources)) if calibrated else {}
    cap_gpu_memory(budget)
    if resources.device == "cuda":
        torch.cuda.init()  # creating the CUDA context is process start-up, not quantization time
    reset_peak_memory()
    start = time.perf_counter()
    mappings: list[dict] = []
    routing: list[RoutingRecord] = []
    unfuse(model)  # before oneshot, which would do it too: the routing counters hook the unfused experts
    counted = counted_routing(model, routing)
    with cpu_safe_awq(), recorded_smoothing(mappings), counted, layer_progress(model, variant.ignore):
        with over_budget("quantize", budget):
            oneshot(
                model=model,
                recipe=recipe,
                shuffle_calibration_samples=False,
                log_dir=None,
                moe_calibrate_all_experts=True,  # every expert's statistics from every token (llm-compressor's default)
                **data,
            )
    seconds = time.perf_counter() - start
    peak, kind = peak_memory_mb()
    quantized = [name for name, module in model.named_modules() if hasattr(module, "quantization_scheme")]
    done = set(quantized)
    skipped = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name not in done
    ]
    to_dtype(model, getattr(torch, dtype)).save_pretrained(out, save_compressed=True)
    checkpoint_expert_names(out)  # the family's own expert names, which vLLM and transformers load
    tokenizer.save_pretrained(out)
    return QuantizeRecord(
        variant=variant.name,
        method=variant.method,
        path=str(final),
        seconds=round(seconds, 2),
        peak_memory_mb=peak,
        memory_kind=kind,
        group_size=scheme.group_size,
        group_size_note=scheme.note,
        quantized_layers=quantized,
        skipped_layers=skipped,
        recipe=yaml.safe_dump([type(m).__name__ + ": " + m.model_dump_json(exclude_none=True) for m in recipe]),
        visible_devices=visible_devices(),
        scheme=", ".join(filter(None, [scheme_label(variant, scheme.group_size, precision), KV_LABELS.get(kv_cache)])),
        smoothing=smoothing(variant, mappings, quantized),
        precision=precision,
        allocated_bits=allocated,
        routing=routing[0] if routing else None,
    )


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model in the artifact's dtype, but NVFP4's per-tensor global scales stay float32, as compressed-tensors
    writes them and vLLM reads them (a bf16 global scale would shift every group scale under it)."""
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("global_scale")}
    model.to(dtype)
    for name, value in kept.items():
        model.get_parameter(name).data = value
    return model


def allocation(variant: WeightVariant, sensitivity: SensitivityRecord | None) -> tuple[dict[str, str], float | None]:
    """A mixed variant's option per Linear from its sensitivity table under its budget; nothing for the others."""
    if not isinstance(variant, MixedVariant):
        return {}, None
    from quantflow.quantization.mixed import allocate, effective_bits, precision_by_layer, rule_allocation
    from quantflow.quantization.sensitivity import read_table

    groups, scores = read_table(sensitivity)
    if variant.allocation == "rule":
        chosen = rule_allocation(groups, variant.target_bits, variant.name)
    else:
        chosen = allocate(groups, scores, variant.target_bits)
    return precision_by_layer(groups, chosen), round(effective_bits(groups, chosen), 4)


def smoothing(variant: WeightVariant, mappings: list[dict], quantized: list[str]) -> Smoothing | None:
    if not isinstance(variant, AWQVariant | AWQGPTQVariant) and getattr(variant, "algorithm", None) != "awq":
        return None
    balanced = {name for mapping in mappings for name in mapping["balance"]}
    return Smoothing(mappings=mappings, unsmoothed=[name for name in quantized if name not in balanced])


def bnb_config(variant: BnbVariant):
    """The transformers ``BitsAndBytesConfig`` of a load-time variant."""
    from transformers import BitsAndBytesConfig

    if variant.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=variant.method.removeprefix("bnb-"),
        bnb_4bit_compute_dtype=getattr(torch, variant.compute_dtype),
        bnb_4bit_use_double_quant=variant.double_quant,
    )
