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

``FP4Linear`` is the module the FP4 runtime swaps in for each quantized Linear: the decode kernel up to 16 rows,
above that the weight dequantized to bf16 for a cuBLAS product (prefill), and the dequantized reference wherever the
kernel cannot run (no CUDA GPU, a width it cannot tile, a failed self-check), which ``route`` names.

Not yet timed on a GPU: where it stands against bf16 and W4A16 is for ``bench/kernels.py`` to measure, and until it
is, only ``evaluation.kernels: fp4`` runs it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

DECODE_ROWS = 16
GROUPS = {"nvfp4-pack-quantized": 16, "mxfp4-pack-quantized": 32}
FORMATS = tuple(GROUPS)
BLOCKS_K = (64, 32, 16)  # packed bytes per K step, largest first: a tile is 2 x BLOCK_K weights wide
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it once too, at import
_problems: dict[str, str | None] = {}  # device -> why the kernel cannot run there, or None (checked once)


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


def block_k(in_features: int) -> int | None:
    """The K step (packed bytes) that tiles ``in_features`` exactly, or None when none does."""
    return next((block for block in BLOCKS_K if in_features % (2 * block) == 0), None)


def decode_linear(x: torch.Tensor, weight: FP4Weight, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x @ W^T`` for 1-16 rows of bf16 ``x`` [rows, K] on the Triton decode kernel; bf16 [rows, N]."""
    from quantflow.kernels import fp4_decode  # noqa: F401 (registers the custom op)

    rows, k = x.shape
    n, width = weight.shape
    if rows > DECODE_ROWS or k != width or k % (2 * block_k):
        raise ValueError(f"the FP4 decode kernel takes 1-{DECODE_ROWS} rows and K a multiple of {2 * block_k}")
    x = x.to(torch.bfloat16).contiguous()
    return torch.ops.quantflow.fp4_decode(x, weight.packed, weight.scale, weight.group, block_n, block_k, DECODE_ROWS)


def device_problem(device: torch.device) -> str | None:
    """Why the FP4 decode kernel cannot run on ``device``, or None when it can: checked once per device against the
    dequantized reference, so a GPU or Triton build that lowers it differently is found here, not as wrong numbers."""
    key = str(device)
    if key not in _problems:
        _problems[key] = _device_problem(device)
    return _problems[key]


def _device_problem(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type != "cuda" and not _INTERPRETED:
        return "the FP4 kernel runs on CUDA GPUs"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return self_check(device)


def self_check(device: torch.device) -> str | None:
    """None when the kernel's product on a random NVFP4 weight is within bf16 rounding of the float32 reference."""
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (96, 128), generator=generator, dtype=torch.uint8)
    scale = (torch.rand(96, 16, generator=generator) + 0.5).to(torch.float8_e4m3fn)
    weight = from_compressed(packed.to(device), scale.to(device), torch.tensor([1.0], device=device), FORMATS[0])
    x = torch.randn(3, 256, generator=generator).to(device, torch.bfloat16)
    try:
        y = decode_linear(x, weight).float()
    except Exception as error:  # a compiler or driver that cannot build it: the runtime says so and runs dense
        return f"the FP4 kernel failed to run ({type(error).__name__})"
    reference = reference_linear(x.float(), weight)
    slack = (x.float().abs() @ dequantize(weight, torch.float32).abs().t()) * 2**-7
    return None if bool(((y - reference).abs() <= slack + 1e-3).all()) else "the FP4 kernel failed its self-check"


class FP4Linear(nn.Module):
    """A Linear whose weight stays FP4 as saved (half a byte per weight plus its group scales)."""

    def __init__(self, weight: FP4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = weight.group
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale", weight.scale)
        self.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False) if bias is not None else None

    @classmethod
    def concat(cls, layers: list[FP4Linear], bias: torch.Tensor | None) -> FP4Linear:
        """One layer computing ``layers`` (same input width and group) side by side: their codes and their effective
        scales (each NVFP4 layer's global scale already folded in) stacked by rows."""
        packed = torch.cat([layer.packed for layer in layers])
        return cls(FP4Weight(packed, torch.cat([layer.scale for layer in layers]), layers[0].group), bias)

    @property
    def weight_fp4(self) -> FP4Weight:
        return FP4Weight(self.packed, self.scale, self.group)

    def route(self, rows: int, device: torch.device) -> str:
        """Which path ``forward`` takes for ``rows`` rows on ``device``: the label the report shows."""
        problem = device_problem(device) or (None if block_k(self.in_features) else "a width the kernel cannot tile")
        if problem is not None:
            return f"FP4 dequantized reference, no kernel ({problem})"
        return "FP4 Triton decode" if rows <= DECODE_ROWS else "FP4 dequantized to bf16 + cuBLAS"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.route(flat.shape[0], x.device) == "FP4 Triton decode":
            y = decode_linear(flat, self.weight_fp4, block_k=block_k(self.in_features))
        else:
            y = flat @ dequantize(self.weight_fp4).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)
