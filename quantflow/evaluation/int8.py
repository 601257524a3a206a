"""Execute compressed-tensors INT8 artifacts on int8 kernels that ship with PyTorch (``quantflow.kernels.int8``).

- W8A8 (the ``int8`` method): int8 weights with one scale per output channel; each call quantizes
  the activations per token to int8 and multiplies on the int8 matmul (``torch._int_mm``, int32
  accumulation), then applies both scales. cuBLAS's int8 matmul needs more than 16 rows, so a
  decode step's few rows are padded to 32.
- W8A16 per output channel (``rtn``/``gptq`` at ``bits: 8``, ``group_size: null``): int8 weights,
  bf16 activations, on PyTorch's weight-only int8 kernel (``aten._weight_int8pack_mm``, the one
  gpt-fast uses). Grouped W8A16 has no such kernel and runs dense.

Scales follow vLLM's dynamic int8 (absmax / 127 per token). Before a model is used, one layer is
checked against its dequantized weights (``check_layer``): a kernel that is missing on a machine,
or wrong, is found at load, and the caller falls back to the dense runtime with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantflow.errors import QuantflowError
from quantflow.kernels.int8 import Int8Linear, Int8WeightOnlyLinear

# where each kind keeps a quantized layer: the tensor that marks it, and the tensors it is built from
LAYOUTS = {
    "w8a8": ("weight_scale", ("weight", "weight_scale")),  # int-quantized: int8 weights as they are
    "w8a16": ("weight_packed", ("weight_packed", "weight_scale", "weight_shape")),  # pack-quantized: 4 per int32
}


def int8_kind(config: dict) -> str | None:
    """'w8a8' or 'w8a16' when the artifact is one int8 scheme these kernels run, else None."""
    quant = config.get("quantization_config") or {}
    groups = list(quant.get("config_groups", {}).values())
    if quant.get("quant_method") != "compressed-tensors" or len(groups) != 1:
        return None
    weights, inputs = groups[0]["weights"], groups[0].get("input_activations")
    channel_int8 = (
        weights.get("type") == "int"
        and weights.get("num_bits") == 8
        and weights.get("strategy") == "channel"
        and weights.get("symmetric")
    )
    if not channel_int8:
        return None
    if inputs is None:
        return "w8a16"
    dynamic_token = inputs.get("type") == "int" and inputs.get("dynamic") is True and inputs.get("strategy") == "token"
    return "w8a8" if dynamic_token and inputs.get("symmetric") else None


def use_int8(model_path: str | Path, kernels: str, device: str) -> bool:
    """INT8 artifacts run on int8 kernels on CUDA under 'auto'; on CPU they run dense (compressed-tensors' own
    simulation), as the report's runtime column says."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return kernels == "auto" and device == "cuda" and int8_kind(config) is not None


def convert(kind: str):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    def layer(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, device: torch.device) -> nn.Module:
        scale = parts["weight_scale"].to(device)
        if kind == "w8a8":
            return Int8Linear(parts["weight"].to(device), scale, bias.to(device) if bias is not None else None)
        shape = torch.Size(parts["weight_shape"].tolist())
        weight = unpack_from_int32(parts["weight_packed"], 8, shape).to(device)
        return Int8WeightOnlyLinear(weight, scale, bias.to(device) if bias is not None else None)

    return layer


@torch.no_grad()
def check_layer(model: nn.Module, tolerance: float = 0.02) -> float:
    """Relative error of one int8 layer against its dequantized weights (activations rounded the same way)."""
    layer = next(m for m in model.modules() if isinstance(m, Int8Linear | Int8WeightOnlyLinear))
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, device=layer.weight.device)
    if isinstance(layer, Int8Linear):
        scale = x.float().abs().amax(-1, keepdim=True) / 127
        x_used = (x.float() / scale).round().clamp(-127, 127) * scale
    else:
        x_used = x.float()
    expected = x_used @ layer.dequantized().t()
    error = ((layer(x).float() - expected).norm() / expected.norm()).item()
    if not error < tolerance:
        raise QuantflowError(
            f"the int8 kernel's output is {error:.1%} off the dequantized reference", "use the dense runtime"
        )
    return error


def load_int8(path: str | Path, device: str) -> tuple[nn.Module, str]:
    """(model, kind) with the artifact's quantized Linears on int8 kernels, one layer checked against the reference."""
    from quantflow.evaluation.packed import load_converted

    kind = int8_kind(json.loads((Path(path) / "config.json").read_text()))
    if kind is None:
        raise QuantflowError("the model folder is not a per-channel int8 artifact", "use the dense runtime")
    marker, parts = LAYOUTS[kind]
    model = load_converted(path, device, marker, parts, convert(kind))
    check_layer(model)
    return model, kind
