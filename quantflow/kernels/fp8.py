"""FP8 W8A8 Linears: e4m3 weights on ``torch._scaled_mm`` (FP8 tensor cores), and the one-row Triton kernels.

Layout: the weight is e4m3 ``[out, in]`` row-major (its ``.t()`` is the column-major operand ``_scaled_mm`` wants) with
one fp32 scale per output row ``[1, out]``; activations are scaled per token to e4m3 (vLLM's dynamic FP8) with fp32
scales ``[rows, 1]``. Reference: ``(x_q * x_scale) @ (weight * scale).T`` in fp32 (``dequantized`` gives the weight).
A one-row product (batch-1 decode) runs on ``quantflow.kernels.fp8_gemv`` (and the gated MLP on
``quantflow.kernels.fp8_mlp``), since cuBLASLt's FP8 GEMM reads the weight at a third of the card's bandwidth there.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from quantflow.kernels.e4m3 import E4M3, E4M3_MAX

GEMV_ROWS = 1  # batch-1 decode runs on quantflow.kernels.fp8_gemv; from 2 rows _scaled_mm was as fast or faster
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of torch ship it; CPU builds do not
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: how CI runs the kernels


def on_gemv(flat: torch.Tensor) -> bool:
    """Whether rows [rows, in] take the one-row Triton kernels (batch-1 decode) instead of ``_scaled_mm``: on CUDA, or
    on CPU tensors under Triton's interpreter (tests/unit/test_fp8_kernels.py)."""
    return flat.shape[0] <= GEMV_ROWS and _HAS_TRITON and (flat.is_cuda or _INTERPRETED)


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

    def dequantized(self) -> torch.Tensor:
        """The weight in fp32 [out, in], e4m3 times its row scale: the reference the kernels are checked against."""
        return self.weight.float() * self.scale.t()

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
