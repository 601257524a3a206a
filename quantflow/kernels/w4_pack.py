"""The W4A16 kernels' weight layout, the one-time repack into it, and the dequantized reference.

Layout (``W4Weight``), made for a cheap unpack straight into the tensor cores' operand:

- ``words``: int32 ``[N_pad / 64, K / BK, 64, BK / 8]``. Each block of 64 output rows by one K tile of ``BK`` values
  (BK = 128 or 64, see ``block_k``) is contiguous (4 KB at BK 128). Word ``j = 8a + i`` (i < 8) of a row holds, as
  unsigned nibbles u = q + 8 at bit ``4s + 16h``, the tile's K value ``16 (s BK / 64 + a) + 2i + h``. Read as 16-bit
  halves, the row's halves ``16a .. 16a + 15`` at nibble ``s`` are 16 consecutive K values in order (half ``2i + h``
  is K value ``.. + 2i + h``): one product of depth 16, loaded contiguously. A word's two halves are two neighbouring
  K values, so ``((word >> 4s) & 0x000F000F) | 0x43004300`` (one ``lop3``) makes both as bf16 ``128 + u`` (the
  magic-number trick: 0x4300 is 128.0, whose last mantissa bits are the nibble), already paired as the tensor cores
  take them. Rows past N (to a multiple of 64) are zero nibbles with scale 0.
- ``scale``: bf16 ``[K / group, N_pad]``, compressed-tensors' per-group scale s.
- ``offset``: bf16 ``[K / group, N_pad]``, ``136 + zp`` (128 from the trick, 8 from u = q + 8; zp = 0 when symmetric):
  small integers, exact in bf16.

So ``w = (q - zp) * s = ((128 + u) - offset) * s``. The kernels multiply the integers ``128 + u`` by the activations
on the tensor cores and apply ``s`` and ``offset`` per group to the fp32 sums: ``s * (dot(128 + u, x) - offset *
sum(x))``, one rounding to bf16 at the end. Channel-wise weights are one group of K.

The repack runs once at load; the reference (``dequantize``) reads the same layout with torch ops, so it checks the
layout as well as standing in wherever no kernel can run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_N = 64  # output rows per contiguous block
BIAS = 128 + 8  # what offset holds besides the zero point


@dataclass(frozen=True)
class W4Weight:
    """A 4-bit weight in the kernels' layout; ``reason`` says why no kernel can run it (None when one can)."""

    words: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    out_features: int
    in_features: int
    group_size: int
    count: torch.Tensor  # int32 split-K arrival counters, one per 64 outputs; the decode kernel leaves them at zero
    reason: str | None = None

    @property
    def block_k(self) -> int:
        return block_k(self.group_size, self.in_features)

    @property
    def padded_out(self) -> int:
        return self.scale.shape[1]


def block_k(group_size: int, in_features: int) -> int:
    """The K tile, 128 or 64 (0 when neither fits): it divides K, and it holds whole groups (of 16 K values at least,
    one product) or lies inside one."""
    fits = (
        tile for tile in (128, 64) if in_features % tile == 0 and (group_size % tile == 0 or tile % group_size == 0)
    )
    return next(fits, 0) if group_size % 16 == 0 else 0


def layout_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a weight cannot take the kernels' layout, or None when it can."""
    if in_features % group_size:
        return f"group size {group_size} does not divide the {in_features} inputs"
    if not block_k(group_size, in_features):
        return (
            f"group size {group_size} over {in_features} inputs: the kernels take groups of 16, 32 or a multiple of 64 "
            "and inputs in multiples of 64"
        )
    return None


def repack(signed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int) -> W4Weight:
    """compressed-tensors' unpacked weight (q in [-8, 7], ``[N, K]``), scale ``[N, K / group]`` and zero point (same
    shape, or None when symmetric) in the kernels' layout. ``group_size`` is K for channel-wise weights.

    A weight the kernels cannot take keeps all its rows in one block and K (padded to a multiple of 64) in one tile:
    the reference reads that the same way."""
    n, k = signed.shape
    zp = zero_point if zero_point is not None else torch.zeros_like(scale)
    reason = layout_problem(n, k, group_size)
    if reason is None:
        n_pad = -(-n // TILE_N) * TILE_N
        unsigned = torch.nn.functional.pad(signed.to(torch.int32) + 8, (0, 0, 0, n_pad - n))
        words = _words(unsigned, TILE_N, block_k(group_size, k))
    else:
        n_pad = n
        unsigned = torch.nn.functional.pad(signed.to(torch.int32) + 8, (0, -k % 64))
        words = _words(unsigned, n, unsigned.shape[1])
    pad = (0, 0, 0, n_pad - n)
    scale_t = torch.nn.functional.pad(scale.to(torch.bfloat16), pad).t().contiguous()
    offset_t = torch.nn.functional.pad((zp.float() + BIAS).to(torch.bfloat16), pad, value=BIAS).t().contiguous()
    count = torch.zeros(-(-n_pad // TILE_N), dtype=torch.int32, device=signed.device)
    return W4Weight(words, scale_t, offset_t, n, k, group_size, count, reason)


def _words(unsigned: torch.Tensor, rows: int, tile: int) -> torch.Tensor:
    """u ``[N, K]`` as the layout's words ``[N / rows, K / tile, rows, tile / 8]``."""
    n, k = unsigned.shape
    nibbles = unsigned.view(n // rows, rows, k // tile, 4, tile // 64, 8, 2)  # the tile's K as [s, a, i, h]
    nibbles = nibbles.permute(0, 1, 2, 4, 5, 3, 6).reshape(n // rows, rows, k // tile, tile // 8, 4, 2)  # [word, s, h]
    words = (nibbles.long() << _shifts(unsigned.device)).sum(dim=(-2, -1))  # disjoint bits: the sum is an OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.permute(0, 2, 1, 3).contiguous()


def _shifts(device: torch.device) -> torch.Tensor:
    """Bit position of value ``2s + h`` of a word: ``[4, 2]``."""
    return 4 * torch.arange(4, device=device).view(4, 1) + 16 * torch.arange(2, device=device).view(1, 2)


def unsigned_nibbles(weight: W4Weight) -> torch.Tensor:
    """u = q + 8 as int32 ``[N, K]`` read back from the words (the layout's own inverse)."""
    blocks, tiles, rows, per_row = weight.words.shape
    nibbles = (weight.words[..., None, None] >> _shifts(weight.words.device)) & 15  # [blocks, tiles, rows, words, 4, 2]
    nibbles = nibbles.view(blocks, tiles, rows, per_row // 8, 8, 4, 2)  # [..., a, i, s, h]
    full = nibbles.permute(0, 2, 1, 5, 3, 4, 6).reshape(blocks * rows, tiles * per_row * 8)  # K as [tile, s, a, i, h]
    return full[: weight.out_features, : weight.in_features]


def dequantize(weight: W4Weight) -> torch.Tensor:
    """The bf16 weight ``[N, K]``: ``(q - zp) * s`` rounded once, as compressed-tensors' dequantization gives it."""
    n, k, group = weight.out_features, weight.in_features, weight.group_size
    q_minus_zp = unsigned_nibbles(weight).float() + (BIAS - 8) - _per_input(weight.offset.float(), group, n, k)
    return (q_minus_zp * _per_input(weight.scale.float(), group, n, k)).to(torch.bfloat16)


def _per_input(per_group: torch.Tensor, group: int, n: int, k: int) -> torch.Tensor:
    """A ``[K / group, N_pad]`` table spread to ``[N, K]`` (the last group may be short)."""
    return per_group[:, :n].t().repeat_interleave(group, dim=1)[:, :k]


def reference_linear(x: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """``x @ dequantize(weight).T`` in bf16: what runs where no kernel can, and what the kernels are checked against."""
    flat = x.reshape(-1, weight.in_features).to(torch.bfloat16)
    return (flat @ dequantize(weight).t()).reshape(*x.shape[:-1], weight.out_features)
