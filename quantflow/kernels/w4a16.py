"""W4A16 Triton kernels on ``quantflow.kernels.w4_pack``'s layout: a decode product for 1-32 rows, and an unpack to
bf16 for prefill (then cuBLAS).

Decode (``w4a16_decode``). Tensor cores even at one row: the weight tile is the left operand, ``w[BN, BK] @
x^T[BK, 16]`` (rows padded to 16, or 32 for 17-32 rows), fp32 sums. Per K tile the program unpacks the integers
``128 + u`` (exact in bf16), multiplies them on the tensor cores and applies the group's scale and offset to the fp32
sums: ``s * (dot - offset * sum(x))``, so no per-weight scaling at all. Split-K on every linear: programs along K
write fp32 partials, and the last to arrive (an atomic counter per output block, which it sets back to zero, so
nothing needs clearing before the next launch) sums them in a fixed order and writes bf16.

The unpack (``UNPACK``): ``PLAIN`` shifts, masks and converts each nibble in Triton (runs under Triton's CPU
interpreter, which is how CI checks the layout and tiling); ``LOP3`` makes two bf16 values per instruction with inline
PTX ``lop3`` (the magic-number trick the layout is built for), two 16-bit outputs per asm call; it runs on CUDA only
and is checked against the plain form by ``self_check`` at first use and by tests/gpu/test_w4a16_cuda.py. Measured on
an H200 at 7B shapes (bench/results/kernels-w4a16-h200.json): lop3 123 µs a layer at one row with default blocks,
plain 190. Two other forms were slower and are gone: eight products of depth 16 per tile on each nibble position of
the words (no reshape; prmt + lop3: 160 µs, plain 190), and lop3 with its two bf16 outputs packed in one register,
whose pairing of elements Triton does not guarantee (wrong numbers, caught by the check).

Prefill (``w4a16_dequantize``): the same unpack writes ``(q - zp) * s`` in bf16; ``quantflow.kernels.linear`` then
calls cuBLAS, which beats any hand-written product at thousands of rows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantflow.kernels.w4_pack import TILE_N, W4Weight

PLAIN, LOP3 = 0, 1
FORMS = {PLAIN: "plain", LOP3: "lop3"}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    split_k: int = 8
    warps: int = 2
    stages: int = 3


def decode_config(out_features: int, in_features: int, block_k: int) -> DecodeConfig:
    """The blocks a sweep on an H200 picked at 7B shapes (bench/kernels.py, lop3 unpack, one row): 4 warps, 128 outputs
    per program on the wide layers (qkv, gate/up) and 64 on the narrow ones, and K split in the power of two nearest
    to about 450 programs (3.4 per SM): qkv 4, gate/up 2, o 8. down (86 tiles) could split only 2 ways while splits
    had to divide the tiles (43.8 µs, slower than bf16's 29); splits may now run short, so it takes 8 like o."""
    block_n = 128 if out_features >= 8192 else 64
    blocks, tiles = triton.cdiv(out_features, block_n), in_features // block_k
    split = 2 ** max(0, round(math.log2(450 / blocks)))
    return DecodeConfig(block_n, min(split, tiles), 4)


@triton.jit
def _load_unpacked(row_ptrs, mask, BN: tl.constexpr, BK: tl.constexpr, UNPACK: tl.constexpr):
    """bf16 [BN, BK] of 128 + u for one K tile in K order, from each row's first word pointer ``row_ptrs`` [BN]."""
    W: tl.constexpr = BK // 8
    words = tl.load(row_ptrs[:, None] + tl.arange(0, W)[None, :], mask=mask[:, None])
    shifted = words[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]  # [BN, W, 4]: values 2s, 2s + 1 at 0 and 16
    if UNPACK == 0:
        u = (shifted[:, :, :, None] >> (tl.arange(0, 2) * 16)[None, None, None, :]) & 15
        pairs = (u + 128).to(tl.float32).to(tl.bfloat16)  # via fp32: the CPU interpreter botches int -> bf16
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; mov.b32 {$0, $1}, t; }",
            "=h,=h,r", [shifted], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1,
        )  # fmt: skip
        pairs = tl.join(lo, hi)
    return tl.reshape(pairs, (BN, BK))


@triton.jit
def _decode_kernel(
    x_ptr, words_ptr, scale_ptr, offset_ptr, y_ptr, part_ptr, count_ptr, M, N, N_PAD, K,
    GROUP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr,
    PER_SPLIT: tl.constexpr, UNPACK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    W: tl.constexpr = BK // 8
    outs = pid_n * BN + tl.arange(0, BN)
    rows = tl.arange(0, BM)
    out_ok, row_ok = outs < N_PAD, rows < M
    tiles = K // BK
    first = pid_k * PER_SPLIT  # PER_SPLIT = ceil(tiles / SPLIT): a constant trip count; the last split may run short
    row_words = (outs // 64) * (tiles * 64 * W) + (outs % 64) * W  # [BN]: the row's first word in tile 0
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for step in range(PER_SPLIT):
        t = first + step
        in_k = t < tiles  # past the end: x and scales load as zeros, so the tile adds nothing
        ks = t * BK + tl.arange(0, BK)
        xt = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=row_ok[None, :] & in_k, other=0.0)  # [BK, BM]
        w = _load_unpacked(words_ptr + row_words + t * (64 * W), out_ok & in_k, BN, BK, UNPACK)
        if INTERPRET:  # the CPU interpreter multiplies bf16 tiles as their raw bits: give it fp32 (exact here)
            dot = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            dot = tl.dot(w, xt)  # [BN, BM]: sum of (128 + u) x
        x_sum = tl.sum(xt.to(tl.float32), axis=0)  # [BM]
        group = t * BK // GROUP
        scale = tl.load(scale_ptr + group * N_PAD + outs, mask=out_ok & in_k, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + group * N_PAD + outs, mask=out_ok & in_k, other=0.0).to(tl.float32)
        acc += scale[:, None] * (dot - offset[:, None] * x_sum[None, :])
    y_ptrs = y_ptr + rows[None, :] * N + outs[:, None]
    y_mask = row_ok[None, :] & (outs < N)[:, None]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(tl.bfloat16), mask=y_mask)
    else:
        part_ptrs = part_ptr + (outs[:, None] * BM + rows[None, :])  # partials [SPLIT, N_PAD, BM]
        tl.store(part_ptrs + pid_k * N_PAD * BM, acc, mask=out_ok[:, None])
        tl.debug_barrier()  # every warp's partials are written before the release below publishes them
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last program of this output block: sum in split order, reset the counter
            total = tl.zeros((BN, BM), dtype=tl.float32)
            for split in range(SPLIT):
                total += tl.load(part_ptrs + split * N_PAD * BM, mask=out_ok[:, None], other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(tl.bfloat16), mask=y_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed")


@triton.jit
def _dequantize_kernel(
    words_ptr, scale_ptr, offset_ptr, w_ptr, N, N_PAD, K,
    GROUP: tl.constexpr, BK: tl.constexpr, UNPACK: tl.constexpr,
):  # fmt: skip
    block, t = tl.program_id(0), tl.program_id(1)
    W: tl.constexpr = BK // 8
    tiles = K // BK
    outs = block * 64 + tl.arange(0, 64)
    group = t * BK // GROUP
    scale = tl.load(scale_ptr + group * N_PAD + outs).to(tl.float32)
    offset = tl.load(offset_ptr + group * N_PAD + outs).to(tl.float32)
    row_ptrs = words_ptr + (block * tiles + t) * (64 * W) + tl.arange(0, 64) * W
    w = (_load_unpacked(row_ptrs, outs >= 0, 64, BK, UNPACK).to(tl.float32) - offset[:, None]) * scale[:, None]
    ks = t * BK + tl.arange(0, BK)
    tl.store(w_ptr + outs[:, None] * K + ks[None, :], w.to(tl.bfloat16), mask=(outs < N)[:, None])


def decode_launch(x: torch.Tensor, weight: W4Weight, config: DecodeConfig, unpack: int) -> torch.Tensor:
    """``x @ w.T`` in bf16 for bf16 ``x`` [rows <= 32, K] on one configuration (bench/kernels.py times several)."""
    rows = x.shape[0]
    tiles = weight.in_features // weight.block_k
    if not 1 <= config.split_k <= tiles:
        raise ValueError(f"split_k {config.split_k} is not between 1 and the {tiles} K tiles")
    if rows > 32:
        raise ValueError(f"the W4 decode kernel takes at most 32 rows, got {rows}")
    block_m = 16 if rows <= 16 else 32
    n, n_pad, k = weight.out_features, weight.padded_out, weight.in_features
    y = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    part = torch.empty(
        config.split_k if config.split_k > 1 else 0, n_pad, block_m, dtype=torch.float32, device=x.device
    )
    grid = (triton.cdiv(n_pad, config.block_n), config.split_k)
    torch.library.wrap_triton(_decode_kernel)[grid](
        x, weight.words, weight.scale, weight.offset, y, part, weight.count, rows, n, n_pad, k,
        GROUP=weight.group_size, BK=weight.block_k, BN=config.block_n, BM=block_m, SPLIT=config.split_k,
        PER_SPLIT=triton.cdiv(tiles, config.split_k),
        UNPACK=unpack, INTERPRET=INTERPRETED, num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    return y


def dequantize_launch(weight: W4Weight, unpack: int) -> torch.Tensor:
    """The bf16 weight [N, K], ``(q - zp) * s`` rounded once (the reference's numbers)."""
    n, k = weight.out_features, weight.in_features
    w = torch.empty(n, k, dtype=torch.bfloat16, device=weight.words.device)
    torch.library.wrap_triton(_dequantize_kernel)[(weight.padded_out // TILE_N, k // weight.block_k)](
        weight.words, weight.scale, weight.offset, w, n, weight.padded_out, k,
        GROUP=weight.group_size, BK=weight.block_k, UNPACK=unpack, num_warps=4,
    )  # fmt: skip
    return w


def _weight(words, scale, offset, count, out_features: int, group_size: int) -> W4Weight:
    return W4Weight(words, scale, offset, out_features, words.shape[1] * words.shape[3] * 8, group_size, count)


@torch.library.triton_op("quantflow::w4a16_decode", mutates_args={})
def w4a16_decode(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    count: torch.Tensor,
    out_features: int,
    group_size: int,
    unpack: int,
) -> torch.Tensor:
    """``x @ w.T`` in bf16 for ``x`` [rows <= 32, K] and a weight in ``w4_pack``'s layout, given by its tensors (a
    custom op takes no records). ``count`` comes back to zero, so the op mutates nothing."""
    weight = _weight(words, scale, offset, count, out_features, group_size)
    config = decode_config(out_features, weight.in_features, weight.block_k)
    return decode_launch(x, weight, config, unpack)


@torch.library.triton_op("quantflow::w4a16_dequantize", mutates_args={})
def w4a16_dequantize(
    words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, out_features: int, group_size: int, unpack: int
) -> torch.Tensor:
    """The weight in bf16 [N, K] for the prefill path's cuBLAS product."""
    return dequantize_launch(_weight(words, scale, offset, scale, out_features, group_size), unpack)


def self_check(device: torch.device) -> int | str:
    """LOP3 when its unpack gives the plain one's integers exactly and its product the plain one's numbers, else PLAIN;
    a string when even the plain kernels disagree with the reference. Run once per device on a random weight (with
    a split-K that runs short), so a GPU or Triton build that lowers the kernels or the inline PTX differently is
    found here instead of as wrong numbers."""
    from quantflow.kernels.w4_pack import dequantize, repack

    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (192, 640), generator=generator, dtype=torch.int8)
    scale = (torch.rand(192, 5, generator=generator) + 0.5).to(torch.bfloat16)
    zero_point = torch.randint(-8, 8, (192, 5), generator=generator)
    weight = repack(q.to(device), scale.to(device), zero_point.to(device), 128)
    unit = repack(q.to(device), torch.ones_like(scale).to(device), None, 128)
    x = torch.randn(5, 640, generator=generator).to(device, torch.bfloat16)
    config = DecodeConfig(split_k=2)  # 5 tiles: splits of 3 and 2
    dense = dequantize(weight).float()
    expected, slack = x.float() @ dense.t(), x.float().abs() @ dense.abs().t() * 2**-8  # + the weight's rounding
    try:
        plain = decode_launch(x, weight, config, PLAIN)
        right = ((plain.float() - expected).abs() <= expected.abs() * 2**-8 + slack).all()
        right = right and torch.equal(dequantize_launch(weight, PLAIN), dequantize(weight))
    except Exception as error:  # noqa: BLE001 - any failure to build or run means: no kernel here
        return f"the W4 kernels failed to run here ({type(error).__name__})"
    if not right:
        return "the W4 kernels disagreed with the dequantized reference on this GPU"
    try:
        unpacked = dequantize_launch(unit, LOP3).to(torch.int8)
        same = torch.equal(unpacked, q.to(device)) and torch.equal(decode_launch(x, weight, config, LOP3), plain)
    except Exception:  # noqa: BLE001 - the inline PTX does not build here: the plain unpack runs
        return PLAIN
    return LOP3 if same else PLAIN
