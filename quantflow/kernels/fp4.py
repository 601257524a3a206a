"""FP4 (E2M1) weight-only products: compressed-tensors' NVFP4 and MXFP4 weights times bf16 activations.

Layout (compressed-tensors' ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``, used as saved, no repack):

- ``packed``: uint8 ``[N, K/2]``; byte ``j`` of a row holds K index ``2j`` in its low nibble and ``2j+1`` in its
  high nibble. A nibble is sign (bit 3) and a magnitude index (bits 0-2) into E2M1's values 0, 0.5, 1, 1.5, 2, 3,
  4, 6: exponent ``e = index >> 1``, mantissa ``m = index & 1``, value ``m / 2`` when ``e == 0`` (subnormal), else
  ``(1 + m / 2) * 2^(e - 1)``.
- ``scale``: uint8 ``[N, K/group]``, the group's scale byte as saved: NVFP4 (group 16) an FP8 E4M3 value, MXFP4
  (group 32) an E8M0 exponent ``s`` meaning ``2^(s - 127)``.
- ``global_scale``: float32 ``[N]``, what the group scales are divided by: NVFP4's per-tensor global scale repeated
  over the layer's rows (so that fused layers keep each their own), 1 for MXFP4.

The kernel reads the bytes as saved, 4.5 bits per NVFP4 weight and 4.25 per MXFP4 weight, where float32 group scales
would add 2 and 1 bits: at one row decoding is a matter of bytes read.

The decode kernel computes ``x @ W^T`` for up to 16 rows without a dequantized copy: the nibbles never leave
registers. Rather than interleaving the two nibbles of a byte back into K order (a reshape that Triton routes through
shared memory), it splits the activations instead: ``W_even @ x[:, 0::2] + W_odd @ x[:, 1::2]``, two tensor-core
products per tile with the weight tile as the left operand and the rows padded to 16 (as the W4A16 kernel does).
The E2M1 value and the group's scale are computed from their bits; their product has at most 6 significant bits, so
the bf16 weight tile is exact; fp32 accumulation, and the division by the global scale once per output.
``reference_linear`` is the product on the weight as compressed-tensors dequantizes it (each weight divided by the
global scale and rounded), so the kernel's error against float64 is at most that of the reference.

``FP4Linear`` is the module the FP4 runtime swaps in for each quantized Linear: the decode kernel up to 16 rows,
above that the weight dequantized to bf16 by a Triton kernel for a cuBLAS product (prefill), and the dequantized
reference wherever the kernels cannot run (no CUDA GPU, a width they cannot tile, a failed self-check), which
``route`` names.

Not yet timed on a GPU: where it stands against bf16 and W4A16 is for ``bench/kernels.py`` to measure, and until it
is, only ``evaluation.kernels: fp4`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantflow.kernels import checked_once, triton_problem

DECODE_ROWS = 16
GROUPS = {"nvfp4-pack-quantized": 16, "mxfp4-pack-quantized": 32}
FORMATS = tuple(GROUPS)
SCALE_DTYPES = {  # compressed-tensors' scale dtypes for each format, as the kernel reads them (bytes)
    "nvfp4-pack-quantized": (torch.float8_e4m3fn,),
    "mxfp4-pack-quantized": (torch.uint8, torch.float8_e8m0fnu),
}
BLOCKS_K = (64, 32, 16)  # packed bytes per K step, largest first: a tile is 2 x BLOCK_K weights wide
_problems: dict[str, str | None] = {}  # device -> why the kernels cannot run there, or None (checked once)


@dataclass
class FP4Weight:
    """One Linear's FP4 weight as saved (layout above)."""

    packed: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    group: int
    e8m0: bool  # MXFP4's power-of-two scale bytes, else NVFP4's E4M3

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


def from_compressed(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, fmt: str
) -> FP4Weight:
    """The kernel's weight from an artifact's ``weight_packed``, ``weight_scale`` and, for NVFP4, its
    ``weight_global_scale``: the same tensors, the scale bytes viewed as uint8."""
    if fmt not in GROUPS:
        raise ValueError(f"not an FP4 format: {fmt}")
    rows = packed.shape[0]
    e8m0 = fmt == "mxfp4-pack-quantized"
    if scale.dtype not in SCALE_DTYPES[fmt]:  # a scale_dtype override: its bits are not the bytes the kernel reads
        raise ValueError(f"{fmt} scales stored as {scale.dtype}; the FP4 kernel reads {SCALE_DTYPES[fmt]}")
    if e8m0:
        divisor = torch.ones(rows, dtype=torch.float32, device=packed.device)
    elif global_scale is None:
        raise ValueError("an NVFP4 weight without its global scale")
    else:
        divisor = global_scale.to(torch.float32).reshape(-1).expand(rows)
    raw = scale.view(torch.uint8)
    return FP4Weight(packed.contiguous(), raw.contiguous(), divisor.contiguous(), GROUPS[fmt], e8m0)


def group_scales(weight: FP4Weight) -> torch.Tensor:
    """float32 [N, K/group]: each group's scale divided by its row's global scale, as compressed-tensors computes it."""
    if weight.e8m0:  # E8M0: the byte is a biased power of two
        decoded = torch.exp2(weight.scale.to(torch.float32) - 127)
    else:
        decoded = weight.scale.view(torch.float8_e4m3fn).to(torch.float32)
    return decoded / weight.global_scale[:, None]


def dequantize(weight: FP4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The dense weight [N, K]: compressed-tensors' own unpack of the codes, each value times its group's scale in
    float32, rounded once to ``dtype``."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    n, k = weight.shape
    values = unpack_fp4_from_uint8(weight.packed, n, k, dtype=torch.float32)
    return (values * group_scales(weight).repeat_interleave(weight.group, dim=1)).to(dtype)


def reference_linear(x: torch.Tensor, weight: FP4Weight) -> torch.Tensor:
    """The product on the dequantized weight, in ``x``'s dtype (float64 for the kernel's tests)."""
    return x @ dequantize(weight, x.dtype).T


def block_k(in_features: int) -> int | None:
    """The K step (packed bytes) that tiles ``in_features`` exactly, or None when none does."""
    return next((block for block in BLOCKS_K if in_features % (2 * block) == 0), None)


def dequantize_on_kernel(weight: FP4Weight) -> torch.Tensor:
    """``dequantize(weight)`` in bf16 by the Triton kernel (the same numbers, read from the saved bytes)."""
    from quantflow.kernels import fp4_decode  # noqa: F401 (registers the custom op)

    step = block_k(weight.shape[1])
    if step is None:
        raise ValueError(f"the FP4 kernels take K a multiple of {2 * BLOCKS_K[-1]}")
    return torch.ops.quantflow.fp4_dequantize(
        weight.packed, weight.scale, weight.global_scale, weight.group, weight.e8m0, step
    )


def decode_linear(x: torch.Tensor, weight: FP4Weight, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x @ W^T`` for 1-16 rows of bf16 ``x`` [rows, K] on the Triton decode kernel; bf16 [rows, N]."""
    from quantflow.kernels import fp4_decode  # noqa: F401 (registers the custom op)

    rows, k = x.shape
    n, width = weight.shape
    if rows > DECODE_ROWS or k != width or k % (2 * block_k):
        raise ValueError(f"the FP4 decode kernel takes 1-{DECODE_ROWS} rows and K a multiple of {2 * block_k}")
    x = x.to(torch.bfloat16).contiguous()
    return torch.ops.quantflow.fp4_decode(
        x, weight.packed, weight.scale, weight.global_scale, weight.group, weight.e8m0, block_n, block_k, DECODE_ROWS
    )


def device_problem(device: torch.device) -> str | None:
    """Why the FP4 kernels cannot run on ``device``, or None when they can: checked once per device against the
    dequantized reference, so a GPU or Triton build that lowers them differently is found here, not as wrong numbers."""
    return checked_once(_problems, device, lambda d: triton_problem(d, "FP4 kernels") or self_check(d))


def self_check(device: torch.device) -> str | None:
    """None when the kernels' products on random NVFP4 and MXFP4 weights (K steps 64 and 16) are within bf16 rounding
    of the float32 reference, and so is their dequantization."""
    generator = torch.Generator().manual_seed(0)
    for fmt, width in (("nvfp4-pack-quantized", 256), ("mxfp4-pack-quantized", 224)):
        packed = torch.randint(0, 256, (96, width // 2), generator=generator, dtype=torch.uint8).to(device)
        groups = width // GROUPS[fmt]
        if fmt == "nvfp4-pack-quantized":
            scale = (torch.rand(96, groups, generator=generator) + 0.5).to(torch.float8_e4m3fn)
            weight = from_compressed(packed, scale.to(device), torch.tensor([1000.0], device=device), fmt)
        else:
            scale = torch.randint(118, 130, (96, groups), generator=generator, dtype=torch.uint8)
            weight = from_compressed(packed, scale.to(device), None, fmt)
        x = torch.randn(3, width, generator=generator).to(device, torch.bfloat16)
        try:
            y = decode_linear(x, weight, block_k=block_k(width)).float()
            dense = dequantize_on_kernel(weight)
        except Exception as error:  # a compiler or driver that cannot build them: the runtime says so, runs dense
            return f"the FP4 kernels failed to run ({type(error).__name__})"
        exact = dequantize(weight, torch.float32)
        slack = (x.float().abs() @ exact.abs().t()) * 2**-7
        rounded = exact.to(torch.bfloat16).float()  # the kernel's within one bf16 unit (the CPU interpreter truncates)
        off = (dense.float() - rounded).abs() > rounded.abs() * 2**-7
        if not bool(((y - x.float() @ exact.t()).abs() <= slack + 1e-3).all()) or bool(off.any()):
            return f"the FP4 kernels failed their self-check ({fmt})"
    return None


class FP4Linear(nn.Module):
    """A Linear whose weight stays FP4 as saved (half a byte per weight plus its group scales)."""

    def __init__(self, weight: FP4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group, self.e8m0 = weight.group, weight.e8m0
        self.block_k = block_k(self.in_features)  # None: a width the kernels cannot tile
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("global_scale", weight.global_scale)
        self.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False) if bias is not None else None

    @classmethod
    def concat(cls, layers: list[FP4Linear], bias: torch.Tensor | None) -> FP4Linear:
        """One layer computing ``layers`` (same input width and format) side by side: codes, scale bytes and each
        row's global scale stacked by rows."""
        weight = FP4Weight(
            *(torch.cat([getattr(layer, name) for layer in layers]) for name in ("packed", "scale", "global_scale")),
            layers[0].group,
            layers[0].e8m0,
        )
        return cls(weight, bias)

    @property
    def weight_fp4(self) -> FP4Weight:
        return FP4Weight(self.packed, self.scale, self.global_scale, self.group, self.e8m0)

    def problem(self, device: torch.device) -> str | None:
        """Why this layer runs on the dequantized reference on ``device``, or None when the kernels take it."""
        return device_problem(device) or (None if self.block_k else "a width the kernels cannot tile")

    def route(self, rows: int, device: torch.device) -> str:
        """Which path ``forward`` takes for ``rows`` rows on ``device``: the label the report shows."""
        problem = self.problem(device)
        if problem is not None:
            return f"FP4 dequantized reference, no kernel ({problem})"
        return "FP4 Triton decode" if rows <= DECODE_ROWS else "FP4 dequantized to bf16 by Triton + cuBLAS"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.problem(x.device) is not None:
            y = flat @ dequantize(self.weight_fp4).t()
        elif flat.shape[0] <= DECODE_ROWS:
            y = decode_linear(flat, self.weight_fp4, block_k=self.block_k)
        else:
            y = flat @ dequantize_on_kernel(self.weight_fp4).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
