"""Which runtime measures a variant, and the evaluate step's work: load on that runtime, run the protocol.

A W4 artifact on CUDA runs from its packed weights on int4 kernels (when the scheme allows), an FP8
artifact on FP8 matmuls (on cards that have them), an INT8 one on int8 kernels; a bitsandbytes
variant is quantized as it loads; everything else loads dense through transformers
(compressed-tensors decompress at load, and W8A8 activations are quantized and dequantized in bf16,
so their quality is still measured). The runtime is named in the record, so a report never
compares numbers without saying what produced them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.evaluation.evaluate import BASELINE_LOGPROBS, FP4_FORMATS, EvalRecord
from quantflow.evaluation.fp4 import fp4_activations
from quantflow.infra.resources import Resources
from quantflow.spec import BnbVariant, CalibrationSpec, EvaluationSpec


class Subject(BaseModel):
    """What is evaluated: a model folder, optionally quantized by bitsandbytes as it loads."""

    name: str
    model_path: str
    bnb: BnbVariant | None = None
    kv_cache: str = "bf16"  # a runtime KV scheme (RUNTIME_KV) to emulate on the loaded model, else the artifact's own


class Protocol(BaseModel):
    """The evaluation settings, plus the calibration settings that decide which texts are held out."""

    calibration: CalibrationSpec
    evaluation: EvaluationSpec


def load_on_runtime(subject: Subject, kernels: str, resources: Resources):
    """(model, tokenizer, (size bytes, size kind), runtime label) for the runtime this subject runs on."""
    from transformers import AutoTokenizer

    from quantflow.evaluation.evaluate import folder_size, load_for_eval
    from quantflow.infra.environment import package_version
    from quantflow.quantization.quantize import bnb_config

    path, device, budget = subject.model_path, resources.device, resources.gpu_memory_gb
    if subject.bnb is not None:
        model, tokenizer = load_for_eval(path, device, resources.compute_dtype, bnb_config(subject.bnb), budget)
        runtime = f"transformers {package_version('transformers')} + bitsandbytes {package_version('bitsandbytes')}"
        if experts_of(path):
            runtime += "; bitsandbytes quantizes Linear layers only, so the fused experts stay bf16"
        return model, tokenizer, (model.get_memory_footprint(), "in_memory_weights"), runtime + moe_note(model, path)
    on_disk = (folder_size(Path(path)), "on_disk_safetensors")
    model, label = on_kernels(path, kernels, device)
    if model is not None:
        runtime = f"PyTorch {package_version('torch')} {label}"
        return model, AutoTokenizer.from_pretrained(path), on_disk, runtime + moe_note(model, path)
    model, tokenizer = load_for_eval(path, device, resources.compute_dtype, None, budget)
    runtime = f"transformers {package_version('transformers')}" + dense_note(Path(path)) + label
    return model, tokenizer, on_disk, runtime + moe_note(model, path)


def experts_of(path: str) -> int | None:
    from quantflow.quantization.moe import experts_per_layer

    return experts_per_layer(json.loads((Path(path) / "config.json").read_text()))


def moe_note(model, path: str) -> str:
    """For a mixture of experts, how its experts ran (nothing for a dense model)."""
    from quantflow.quantization.moe import expert_runtime

    experts = experts_of(path)
    return expert_runtime(model, experts) if experts else ""


def on_kernels(path: str, kernels: str, device: str):
    """(model, label) on the artifact's quantized kernels, or (None, why they were refused, or '') for dense."""
    from quantflow.evaluation.fp4 import LABEL, fp4_kernel_missing, load_fp4, use_fp4
    from quantflow.evaluation.fp8 import load_fp8, use_fp8
    from quantflow.evaluation.int4 import load_int4, runtime_label, use_int4
    from quantflow.evaluation.int8 import load_int8, use_int8

    if use_fp4(path, kernels, device):  # asked for by name: no silent substitute
        problem = fp4_kernel_missing(device)
        if problem is not None:
            raise QuantflowError(f"evaluation.kernels 'fp4': {problem}", "set evaluation.kernels to 'auto'")
        return load_fp4(path, device), LABEL
    kernels = "auto" if kernels == "fp4" else kernels  # the other variants run as under 'auto'
    if use_int4(path, kernels, device):
        try:
            model = load_int4(path, device)
        except (QuantflowError, RuntimeError) as error:  # a mixed artifact's int8 kernel missing or off its reference
            if kernels == "int4":
                raise
            return None, f"; int4/int8 kernels refused ({str(error).splitlines()[0]}), so dense"
        return model, runtime_label(model)
    if use_fp8(path, kernels, device):
        try:
            label = "FP8 matmuls (_scaled_mm, batch 1 on a Triton GEMV; e4m3, per-token activation scales)"
            return load_fp8(path, device), label
        except QuantflowError as error:
            if kernels == "fp8":  # asked for by name: no silent substitute
                raise
            return None, f"; FP8 matmuls refused ({error.problem}), so dense"
    if use_int8(path, kernels, device):
        try:
            model, kind = load_int8(path, device)
        except (QuantflowError, RuntimeError) as error:  # a kernel this machine lacks, or one that failed its check
            return None, f"; int8 kernels refused ({str(error).splitlines()[0]}), so dense"
        names = {"w8a8": "int8 matmuls (_int_mm, per-token activation scales)", "w8a16": "int8 weight-only kernel"}
        return model, f"{names[kind]} on the int8 weights"
    return None, ""


def dense_note(path: Path) -> str:
    """What the dense runtime does with an artifact's quantization: weights dequantized; W8A8 activations
    fake-quantized per token, so the quality is the quantized model's though the matmuls are bf16."""
    quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return ""
    groups = quant.get("config_groups", {}).values()
    if quant.get("format") in FP4_FORMATS:
        acts = fp4_activations(path)
        return ", compressed-tensors FP4 weights dequantized at load (exact emulation; no FP4 matmuls here)" + (
            ", activations quantized to FP4 and back per group: W4A4 not timed, no FP4 kernel here"
            if acts
            else ", timed dense in bf16: not an FP4 kernel's speed (evaluation.kernels 'fp4' times quantflow's)"
        )
    if any(group.get("input_activations") for group in groups):
        return ", compressed-tensors: weights dequantized, activations quantized per token and back (simulated W8A8)"
    return ", compressed-tensors decompressed to dense at load"


def evaluate_subject(
    out: Path, final: Path, subject: Subject, protocol: Protocol, resources: Resources, baseline: str | None
) -> EvalRecord:
    """The evaluate step's work: one subject under the run's protocol, within the GPU budget.

    ``baseline`` is the baseline's saved log-probabilities (for KL); without it, and with KL on,
    this is the baseline, and its log-probabilities are saved into ``out`` for the variants.
    """
    from quantflow.evaluation.evaluate import evaluate_model, timed
    from quantflow.evaluation.kv_cache import emulate_runtime_kv
    from quantflow.infra.resources import cap_gpu_memory, over_budget
    from quantflow.inputs.corpus import evaluation_documents
    from quantflow.quantization.kv_cache import KV_LABELS, RUNTIME_KV

    resources.use_compile_cache()
    cap_gpu_memory(resources.gpu_memory_gb)
    phases: dict[str, float] = {}
    with over_budget("evaluate", resources.gpu_memory_gb):
        with timed(phases, "load"):
            model, tokenizer, size, runtime = load_on_runtime(subject, protocol.evaluation.kernels, resources)
            if subject.kv_cache in RUNTIME_KV:
                emulate_runtime_kv(model, subject.kv_cache)
                runtime += f"; {KV_LABELS[subject.kv_cache]}"
        texts = evaluation_documents(protocol.calibration, protocol.evaluation)
        evaluation = protocol.evaluation
        if fp4_activations(Path(subject.model_path)):  # an emulated FP4 matmul's time would be a guess
            evaluation = evaluation.model_copy(update={"speed": None})
        keep = baseline is None and protocol.evaluation.kl_tokens
        return evaluate_model(
            model,
            tokenizer,
            subject.name,
            texts,
            evaluation,
            runtime,
            size,
            baseline=Path(baseline) if baseline else None,
            save_baseline=out / BASELINE_LOGPROBS if keep else None,
            phases=phases,
        )
