"""Execute compressed-tensors FP8 W8A8 artifacts on FP8 matmuls (``torch._scaled_mm``).

transformers loads an FP8 artifact's weights and runs them through compressed-tensors' forward,
which dequantizes the weight and fake-quantizes each activation in bf16: the quality is the FP8
model's, the speed and memory are not. Here every quantized Linear keeps its e4m3 weight and
per-output-channel scale; each call scales the activations per token to e4m3 (as vLLM's dynamic
FP8 does) and calls PyTorch's ``_scaled_mm`` with row-wise scales, which runs on the FP8 tensor
cores of Ada and Hopper GPUs (compute capability 8.9+); the Linears and their one-row kernels are
``quantflow.kernels.fp8``'s. Here: which artifacts and machines take them, and loading. Nothing else needs installing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantflow.errors import QuantflowError
from quantflow.kernels.fp8 import FP8Linear

MIN_CAPABILITY = (8, 9)


def fp8_matmuls_missing(device: str) -> str | None:
    """Why this machine cannot run FP8 matmuls for quantflow, or None when it can."""
    if device != "cuda" or not torch.cuda.is_available():
        return "the run is on CPU; quantflow runs FP8 matmuls on CUDA GPUs only"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}"
    return None


def fp8_matmuls(device: str) -> bool:
    return fp8_matmuls_missing(device) is None


def fp8_scheme(config: dict) -> dict:
    """The artifact's FP8 scheme, refused unless these kernels run it (channel weights, token activations)."""
    quant = config.get("quantization_config") or {}
    groups = list(quant.get("config_groups", {}).values())
    if quant.get("quant_method") != "compressed-tensors" or len(groups) != 1:
        raise QuantflowError(
            "the model folder is not a one-scheme compressed-tensors artifact", "use the dense runtime"
        )
    weights, inputs = groups[0]["weights"], groups[0].get("input_activations") or {}
    wanted = (
        weights.get("type") == "float"
        and weights.get("num_bits") == 8
        and weights.get("strategy") == "channel"
        and inputs.get("type") == "float"
        and inputs.get("dynamic") is True
        and inputs.get("strategy") == "token"
    )
    if not wanted:
        raise QuantflowError(
            "the FP8 runtime runs 8-bit float weights per channel with dynamic per-token activations; this artifact "
            f"has weights {weights.get('type')}{weights.get('num_bits')}/{weights.get('strategy')}, activations "
            f"{inputs.get('type')}/{inputs.get('strategy')}",
            "use the dense runtime for this model",
        )
    return groups[0]


def is_fp8(model_path: str | Path) -> bool:
    try:
        fp8_scheme(json.loads((Path(model_path) / "config.json").read_text()))
    except QuantflowError:
        return False
    return True


def use_fp8(model_path: str | Path, kernels: str, device: str) -> bool:
    """FP8 artifacts run on FP8 matmuls under 'fp8' (plan refuses machines without them) and under 'auto' where the
    card has them."""
    return kernels in ("auto", "fp8") and is_fp8(model_path) and fp8_matmuls(device)


def convert_layer(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, device: torch.device) -> FP8Linear:
    return FP8Linear(
        parts["weight"].to(device), parts["weight_scale"].to(device), bias.to(device) if bias is not None else None
    )


def load_fp8(path: str | Path, device: str) -> nn.Module:
    """Load an FP8 W8A8 artifact with its quantized Linears on FP8 matmuls and everything else in bf16."""
    from quantflow.evaluation.packed import load_converted

    fp8_scheme(json.loads((Path(path) / "config.json").read_text()))
    model = load_converted(path, device, "weight_scale", ("weight", "weight_scale"), convert_layer)
    odd = [
        n for n, m in model.named_modules() if isinstance(m, FP8Linear) and (m.in_features % 16 or m.out_features % 16)
    ]
    if odd:
        raise QuantflowError(
            f"FP8 matmuls need layer widths that are multiples of 16; {len(odd)} layers are not (e.g. {odd[0]})",
            "use the dense runtime (evaluation.kernels: auto or dense)",
        )
    return model
