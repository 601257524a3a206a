"""FP4 (E2M1) weight-only products: compressed-tensors' NVFP4 and MXFP4 weights times bf16 activations.

Layout (compressed-tensors' ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``, used as saved, no repack):

- ``packed``: uint8 ``[N, K/2]``; byte ``j`` of a row holds K index ``2j`` in its low nibble and ``2j+1`` in its
  high nibble. A nibble is sign (bit 3) and a magnitude index (bits 0-2) into E2M1's values 0, 0.5, 1, 1.5, 2, 3,
  4, 6: exponent ``e = index >> 1``, mantissa ``m = index & 1``, value ``m / 2`` when ``e == 0`` (subnormal), else
  ``(1 + m / 2) * 2^(e - 1)``.
- ``scale``: float32 ``[N, K/group]``, the group's dequantization scale, taken once at load: NVFP4 (group 16) stores
  an FP8 E4M3 scale per group and one float32 global scale, and dequantizes with ``scale / global_scale``; MXFP4
  (group 32) stores an E8M0 exponent byte ``s`` per group, the scale ``2^(s - 127)``.

The decode kernel computes ``x @ W^T`` for up to 16 rows without a dequantized copy: the nibbles never leave
registers. Rather than interleaving the two nibbles of a byte back into K order (a reshape that Triton routes through
shared memory), it splits the activations instead: ``W_even @ x[:, 0::2] + W_odd @ x[:, 1::2]``, two tensor-core
products per tile with the weight tile as the left operand and the rows padded to 16 (as the W4A16 kernel does).
The E2M1 value is computed from the three bits, the group scale applied per weight before the product (bf16), fp32
accumulation. ``reference_linear`` is the same product on the weight as compressed-tensors dequantizes it.

Not yet timed on a GPU: where it stands against bf16 and W4A16 is for ``bench/kernels.py`` to measure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DECODE_ROWS = 16
GROUPS = {"nvfp4-pack-quantized": 16, "mxfp4-pack-quantized": 32}


@dataclass
class FP4Weight:
    """One Linear's FP4 weight as saved: ``packed`` uint8 [N, K/2], ``scale`` float32 [N, K/group]."""

    packed: torch.Tensor
    scale: torch.Tensor
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


def from_compressed(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, fmt: str
) -> FP4Weight:
    """The kernel's weight from an artifact's ``weight_packed``, ``weight_scale`` and, for NVFP4, its
    ``weight_global_scale``."""
    if fmt not in GROUPS:
        raise ValueError(f"not an FP4 format: {fmt}")
    if fmt == "mxfp4-pack-quantized":  # E8M0: the byte is a biased power of two
        effective = torch.exp2(scale.to(torch.float32) - 127)
    else:
        effective = scale.to(torch.float32) / global_scale.to(torch.float32)
    return FP4Weight(packed.contiguous(), effective.contiguous(), GROUPS[fmt])


def dequantize(weight: FP4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The dense weight [N, K]: compressed-tensors' own unpack of the codes, each value times its group's scale in
    float32, rounded once to ``dtype``."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    n, k = weight.shape
    values = unpack_fp4_from_uint8(weight.packed, n, k, dtype=torch.float32)
    return (values * weight.scale.repeat_interleave(weight.group, dim=1)).to(dtype)


def reference_linear(x: torch.Tensor, weight: FP4Weight) -> torch.Tensor:
    """The product on the dequantized weight, in ``x``'s dtype (float64 for the kernel's tests)."""
    return x @ dequantize(weight, x.dtype).T


def decode_linear(x: torch.Tensor, weight: FP4Weight, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x @ W^T`` for 1-16 rows of bf16 ``x`` [rows, K] on the Triton decode kernel; bf16 [rows, N]."""
    import triton

    from quantflow.kernels.fp4_decode import decode

    rows, k = x.shape
    n, width = weight.shape
    if rows > DECODE_ROWS or k != width or k % (2 * block_k):
        raise ValueError(f"the FP4 decode kernel takes 1-{DECODE_ROWS} rows and K a multiple of {2 * block_k}")
    out = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    x = x.to(torch.bfloat16).contiguous()
    grid = (triton.cdiv(n, block_n),)
    decode[grid](
        x, weight.packed, weight.scale, out, rows, n, weight.scale.shape[1],
        K_HALF=k // 2, GROUP_HALF=weight.group // 2, BLOCK_N=block_n, BLOCK_KH=block_k, ROWS=DECODE_ROWS,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
    )  # fmt: skip
    return out
