"""The sensitivity step of a mixed variant: load the model, group its layers, score every group at every option with
the variant's measure, and save the table the allocation reads (``sensitivity.read_table``).

Kept apart from ``quantflow.quantization.sensitivity`` because the direct measure runs the final pass's recipe
(``quantflow.quantization.quantize``), which itself reads the sensitivity table: an import circle otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quantflow.infra.resources import Resources, peak_memory_mb, reset_peak_memory
from quantflow.inputs.calibration import CalibrationRecord, load_samples
from quantflow.quantization.direct import measure_direct
from quantflow.quantization.sensitivity import (
    TABLE_FILE,
    SensitivityRecord,
    fisher_scores,
    gptq_errors,
    kl_scores,
    measurement_samples,
    weight_args,
)
from quantflow.spec import MixedVariant


def measure_sensitivity(
    model_path: str,
    variant: MixedVariant,
    group_size: int | None,
    calibration: CalibrationRecord,
    resources: Resources,
    out: Path,
    final: Path,
    uniform: str | None = None,
    uniform_layers: list[str] | None = None,
) -> SensitivityRecord:
    """The sensitivity step: load the model, group its quantized Linears, score every group at every option, save
    the table as JSON (the report copies it beside itself). ``uniform``: a finished uniform GPTQ artifact (with the
    Linears it quantized) the direct measure starts from instead of its own pass."""
    from transformers import AutoModelForCausalLM

    from quantflow.quantization.moe import routers_kept, unfuse
    from quantflow.quantization.targets import mixed_groups

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, resources.compute_dtype), use_safetensors=True
    )
    model = unfuse(model).to(resources.device)  # a mixture's experts as Linears: each expert its own group
    model.eval().requires_grad_(False)
    variant = routers_kept(variant, model)
    groups = mixed_groups(model, variant, group_size)
    menu = dict.fromkeys([*variant.options, *variant.embeddings])  # the embeddings' menu may add W6
    args = {o: weight_args(o, group_size, variant.symmetric, variant.observer) for o in menu if o != "bf16"}
    samples = measurement_samples(load_samples(calibration), variant.measured_tokens())
    reset_peak_memory()
    start = time.perf_counter()
    if variant.sensitivity == "direct":
        setup = (variant, group_size, calibration, resources)
        scores, started = measure_direct(model, groups, samples, args, setup, (uniform, uniform_layers or []))
    else:
        scores, started = proxy_scores(model, groups, variant, samples, args)
    seconds = time.perf_counter() - start
    table = {
        "measure": variant.sensitivity,
        "unit": "nats of KL from the unquantized model per token",
        "tokens": sum(s.numel() for s in samples),
        "group_size": group_size,
        "start": started,
        "groups": [{**g.model_dump(), "score": scores[g.name]} for g in groups],
    }
    (out / TABLE_FILE).write_text(json.dumps(table, indent=1))
    peak, _ = peak_memory_mb()
    return SensitivityRecord(
        path=str(final / TABLE_FILE),
        measure=variant.sensitivity,
        tokens=table["tokens"],
        groups=len(groups),
        seconds=round(seconds, 2),
        peak_memory_mb=peak,
    )


def proxy_scores(model, groups, variant: MixedVariant, samples, args) -> tuple[dict, str]:
    """``fisher`` or ``kl`` on the weight error the final pass leaves, and which error that was: GPTQ's layer by layer
    under a GPTQ final pass, round-to-nearest's under AWQ. Both the GPTQ Hessians and the scores come from the
    measured tokens (``sensitivity_tokens``), not the whole calibration set the final pass reads: the Hessians' pass
    over Gemma 3 270M's 16k calibration tokens was a fifth of the step, and the options' ranking, not the solved
    weights, is what the step keeps."""
    errors, energy = None, {}
    if variant.algorithm == "gptq":  # score what the final GPTQ pass leaves, not round-to-nearest's error
        errors = gptq_errors(model, groups, samples, args, variant, energy=energy)
    if variant.sensitivity == "fisher":
        scores = fisher_scores(model, groups, samples, args, errors=errors, energy=energy)
    else:
        scores = kl_scores(model, groups, samples, args, errors=errors)
    return scores, "gptq, layer by layer" if errors else "round-to-nearest"
