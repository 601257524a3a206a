"""Execute compressed-tensors FP8 W8A8 artifacts on FP8 matmuls (``torch._scaled_mm``).

transformers loads an FP8 artifact's weights and runs them through compressed-tensors' forward,
which dequantizes the weight and fake-quantizes each activation in bf16: the quality is the FP8
model's, the speed and memory are not. Here every quantized Linear keeps its e4m3 weight and
per-output-channel scale; each call scales the activations per token to e4m3 (as vLLM's dynamic
FP8 does) and calls PyTorch's ``_scaled_mm`` with row-wise scales, which runs on the FP8 tensor
cores of Ada and Hopper GPUs (compute capability 8.9+). A one-row product (batch-1 decode) runs instead on
``quantflow.kernels.fp8_gemv``, the same maths streamed through a Triton kernel, since cuBLASLt's FP8 GEMM reads
the weight at a third of the card's bandwidth there. Nothing else needs installing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from quantflow.errors import QuantflowError
from quantflow.kernels.e4m3 import E4M3, E4M3_MAX

GEMV_ROWS = 1  # batch-1 decode runs on quantflow.kernels.fp8_gemv; from 2 rows _scaled_mm was as fast or faster
MIN_CAPABILITY = (8, 9)
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of torch ship it; CPU builds do not


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


def on_gemv(flat: torch.Tensor) -> bool:
    """Whether rows [rows, in] take the one-row Triton kernels (batch-1 decode) instead of ``_scaled_mm``."""
    return flat.shape[0] <= GEMV_ROWS and flat.is_cuda and _HAS_TRITON


class FP8Linear(nn.Module):
    """A Linear with an e4m3 weight and one fp32 scale per output row; activations scaled per token to e4m3."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in] row-major: its .t() is the column-major operand needed
        self.register_buffer("scale", scale.reshape(1, -1).float().contiguous())
        self.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False) if bias is not None else None

    @classmethod
    def concat(cls, layers: list[FP8Linear], bias: torch.Tensor | None) -> FP8Linear:
        """Layers of one input width as one, outputs side by side (for ``quantflow.evaluation.fuse``)."""
        return cls(
            torch.cat([layer.weight for layer in layers]), torch.cat([layer.scale for layer in layers], dim=1), bias
        )

    @staticmethod
    def quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [rows, in] as e4m3 with their fp32 scales [rows, 1], one per token (vLLM's dynamic FP8)."""
        scale = flat.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
        return (flat.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale

    def gemv(self, quantized: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """This layer's output for ``x`` from its rows already in e4m3, through ``quantflow.kernels.fp8_gemv``."""
        from quantflow.kernels.fp8_gemv import fp8_gemv

        y = fp8_gemv(quantized, scale, self.weight, self.scale).to(torch.bfloat16)
        y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        quantized, scale = self.quantize(flat)
        if on_gemv(flat):
            return self.gemv(quantized, scale, x)
        y = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.scale, bias=self.bias, out_dtype=torch.bfloat16
        )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class FP8GatedMLP(nn.Module):
    """down(SiLU(gate(x)) · up(x)) of FP8 Linears, gate and up fused. One row on CUDA runs three kernels
    (``quantflow.kernels.fp8_mlp``: SiLU·mul and the row maxima in the gate/up kernel, one scaling kernel, the
    down GEMV) where the separate Linears took five; any other input takes the Linears' own path."""

    def __init__(self, gate: FP8Linear, up: FP8Linear, down: FP8Linear) -> None:
        super().__init__()
        self.gate_up, self.down_proj = FP8Linear.concat([gate, up], None), down
        self.intermediate = gate.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if on_gemv(flat):
            from quantflow.kernels.fp8_mlp import fp8_gate_up_silu, fp8_scale_rows

            h = fp8_gate_up_silu(*self.gate_up.quantize(flat), self.gate_up.weight, self.gate_up.scale)
            return self.down_proj.gemv(*fp8_scale_rows(*h), x)
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


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
