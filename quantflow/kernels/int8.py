"""INT8 Linears on kernels that ship with PyTorch.

- W8A8 (``Int8Linear``): int8 weight ``[out, in]`` with one fp32 scale per output channel ``[1, out]``; each call
  quantizes the activations per token to int8 (absmax / 127, vLLM's dynamic int8) and multiplies on ``torch._int_mm``
  (int32 sums), then applies both scales. cuBLAS's int8 matmul needs more than 16 rows, so a decode step's few rows
  are padded to 32.
- W8A16 per output channel (``Int8WeightOnlyLinear``): int8 weight ``[out, in]``, bf16 scale ``[out]``, bf16
  activations, on ``aten._weight_int8pack_mm`` (the kernel gpt-fast uses).

Reference: ``dequantized()``, the weight times its scales in fp32 (``quantflow.evaluation.int8.check_layer`` holds
one layer against it at load).
"""

from __future__ import annotations

import torch
from torch import nn

MIN_ROWS = 17  # cuBLAS int8 GEMM wants more than 16 rows in the first operand


class Int8Linear(nn.Module):
    """W8A8: int8 weight [out, in] with a per-output-channel scale; activations quantized per token."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("scale", scale.reshape(1, -1).float().contiguous())
        self.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False) if bias is not None else None

    @classmethod
    def concat(cls, layers: list[Int8Linear], bias: torch.Tensor | None) -> Int8Linear:
        return cls(torch.cat([m.weight for m in layers]), torch.cat([m.scale for m in layers], dim=1), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        scale = flat.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 127
        quantized = (flat.float() / scale).round().clamp(-127, 127).to(torch.int8)
        if flat.is_cuda and rows < MIN_ROWS:
            quantized = torch.nn.functional.pad(quantized, (0, 0, 0, 32 - rows))
        y = torch._int_mm(quantized, self.weight.t())[:rows].float() * scale * self.scale
        y = y.to(torch.bfloat16) + (self.bias if self.bias is not None else 0)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: int8 weight [out, in] with a per-output-channel scale; bf16 activations."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16).contiguous())
        self.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False) if bias is not None else None

    @classmethod
    def concat(cls, layers: list[Int8WeightOnlyLinear], bias: torch.Tensor | None) -> Int8WeightOnlyLinear:
        return cls(torch.cat([m.weight for m in layers]), torch.cat([m.scale for m in layers]), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
