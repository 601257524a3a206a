"""W4A16 Triton kernels on ``quantflow.kernels.w4_pack``'s layout: a decode product for 1-32 rows, and an unpack to
bf16 for prefill (then cuBLAS).

Decode (``w4a16_decode``). Tensor cores even at one row: the weight tile is the left operand, ``w[BN, 16] @ x^T[16,
BM]`` (rows padded to BM = 8, 16 or 32), fp32 sums. A K tile of 128 (or 64) is 8 (or 4) products of depth 16:
each loads 16 contiguous int16 halves per row (8 words; the layout puts 16 consecutive K values there at one nibble
position), unpacks them straight in the dot operand's register layout to the exact integers ``q - zp`` in bf16, and
multiplies; the fp32 sums of each group are scaled once (``acc += s * dot``). Keeping one product's operand in
registers is what lets Triton skip shared memory for the weights after the copy in (a [BN, 128] operand built by
reshaping went through it). Each tile's scales and offsets are loaded one tile ahead. Split-K on every linear:
programs along K write fp32 partials, and the last to arrive (an atomic counter per output block, which it sets back
to zero, so nothing needs clearing before the next launch) sums them in a fixed order and writes bf16.

The unpack (``UNPACK``): ``PLAIN`` shifts, masks and converts each nibble in Triton (runs under Triton's CPU
interpreter, which is how CI checks the layout and tiling); ``LOP3`` is inline PTX on two values at a time, a shift,
one ``lop3`` (the magic-number trick the layout is built for) and one bf16x2 add of the offset: about 1.5 instructions
a weight. It runs on CUDA only and is checked against the plain form, bit for bit, by ``self_check`` at first use and
by tests/gpu/test_w4a16_cuda.py.

Prefill (``w4a16_dequantize``): plain Triton writes ``(q - zp) * s`` in bf16 (memory-bound: the writes cost more than
any unpack); ``quantflow.kernels.linear`` then calls cuBLAS, which beats any hand-written product at thousands of rows.
"""

from __future__ import annotations

import functools
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


def decode_config(out_features: int, in_features: int, block_k: int, rows: int = 1, sms: int = 132) -> DecodeConfig:
    """Blocks for ``rows`` rows on a GPU of ``sms`` multiprocessors, from sweeps on an H200 at 7B shapes
    (bench/kernels.py --sweep). 128 outputs per program on wide layers (qkv, gate/up), 64 on narrow ones. K split so
    that about 3 programs run per multiprocessor where few wide blocks run (qkv), 4 on other wide layers (gate/up:
    at 5 a multiprocessor a second wave costs half again) and 6 on narrow ones, keeping at least 4 K tiles per
    program. 2 warps, except Hopper's warpgroup product (4 warps) at 16 rows on the few wide blocks and at 32 rows on
    every wide layer; at 1-8 rows 4 warps were 1.6 times slower (qkv)."""
    block_n = 128 if out_features >= 8192 else 64
    blocks, tiles = triton.cdiv(out_features, block_n), in_features // block_k
    few_wide = block_n == 128 and blocks <= 128
    per_sm = 3 if few_wide else 4 if block_n == 128 else 6
    split = max(1, min(tiles // 4, round(per_sm * sms / blocks)))
    width = block_rows(rows)
    warps = 4 if (width == 16 and few_wide) or (width == 32 and block_n == 128) else 2
    return DecodeConfig(block_n, split, warps)


def block_rows(rows: int) -> int:
    """Rows padded to the tensor cores' product width: 8, 16 or 32 (the product's N; 8 halves the work of 16)."""
    return 8 if rows <= 8 else 16 if rows <= 16 else 32


@triton.jit
def _unpack(halves, neg_offset, S: tl.constexpr, UNPACK: tl.constexpr):
    """bf16 ``q - zp`` (exact: ``128 + u - offset``) at nibble ``S`` of int16 halves [BN, 16] (elements 2i and 2i + 1:
    one word's two halves), ``neg_offset`` [BN, 1] in bf16.

    LOP3: per element pair one asm call (pack=2: the two halves in one register, which is the word itself when the
    pair is 2i, 2i + 1): a shift, one lop3 (two bf16 ``128 + u``) and one bf16x2 fma adding the offset, and the pair
    is the dot's operand register as it stands. Which elements a call receives is Triton's choice (in the dot
    operand's layout a thread holds such pairs); the self-check finds any other pairing."""
    if UNPACK == 0:
        u = (halves.to(tl.int32) >> (4 * S)) & 15
        return ((u + 128).to(tl.float32) + neg_offset.to(tl.float32)).to(tl.bfloat16)  # ints: exact in fp32 and bf16
    elif S == 0:
        asm: tl.constexpr = (
            "{ .reg .b32 t, one; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xEA; mov.b32 one, 0x3F803F80; "
            "fma.rn.bf16x2 $0, t, one, $2; }"
        )
        return tl.inline_asm_elementwise(asm, "=r,r,r", [halves, neg_offset], tl.bfloat16, is_pure=True, pack=2)
    elif S == 1:
        asm: tl.constexpr = (
            "{ .reg .b32 t, one; shr.b32 t, $1, 4; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
            "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, t, one, $2; }"
        )
        return tl.inline_asm_elementwise(asm, "=r,r,r", [halves, neg_offset], tl.bfloat16, is_pure=True, pack=2)
    elif S == 2:
        asm: tl.constexpr = (
            "{ .reg .b32 t, one; shr.b32 t, $1, 8; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
            "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, t, one, $2; }"
        )
        return tl.inline_asm_elementwise(asm, "=r,r,r", [halves, neg_offset], tl.bfloat16, is_pure=True, pack=2)
    else:
        asm: tl.constexpr = (
            "{ .reg .b32 t, one; shr.b32 t, $1, 12; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
            "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, t, one, $2; }"
        )
        return tl.inline_asm_elementwise(asm, "=r,r,r", [halves, neg_offset], tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _group_params(scale_ptr, offset_ptr, t, tiles, outs, out_ok, N_PAD, BK: tl.constexpr, GROUP: tl.constexpr,
                  TILE_GROUPS: tl.constexpr):  # fmt: skip
    """fp32 scales and negated offsets [BN, TILE_GROUPS] of tile ``t``'s groups; zeros past the last tile."""
    groups = t * BK // GROUP + tl.arange(0, TILE_GROUPS)
    at = groups[None, :] * N_PAD + outs[:, None]
    mask = out_ok[:, None] & (t < tiles)
    scales = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    return scales, -tl.load(offset_ptr + at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pick(per_group, g: tl.constexpr, TILE_GROUPS: tl.constexpr):
    """Column ``g`` of a [BN, TILE_GROUPS] table."""
    if TILE_GROUPS == 1:
        return tl.reshape(per_group, (per_group.shape[0],))
    return tl.sum(tl.where(tl.arange(0, TILE_GROUPS)[None, :] == g, per_group, 0.0), axis=1)


@triton.jit
def _decode_kernel(
    x_ptr, halves_ptr, scale_ptr, offset_ptr, y_ptr, part_ptr, count_ptr, M, N, N_PAD, K,
    GROUP: tl.constexpr, BK: tl.constexpr, TILE_GROUPS: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, UNPACK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    # product p of a tile: 16 halves of 8-word chunk p % CHUNKS at nibble p // CHUNKS, K values 16p .. 16p + 15
    CHUNKS: tl.constexpr = BK // 64
    PRODUCTS: tl.constexpr = BK // 16 // TILE_GROUPS  # products of depth 16 per group
    outs = pid_n * BN + tl.arange(0, BN)
    rows = tl.arange(0, BM)
    depth = tl.arange(0, 16)
    out_ok, row_ok = outs < N_PAD, rows < M
    tiles = K // BK
    first = pid_k * PER_SPLIT  # PER_SPLIT = ceil(tiles / SPLIT): a constant trip count; the last split may run short
    row_halves = (outs // 64) * (tiles * 16 * BK) + (outs % 64) * (BK // 4)  # [BN]: the row's first half in tile 0
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    scales, neg_offsets = _group_params(
        scale_ptr, offset_ptr, first, tiles, outs, out_ok, N_PAD, BK, GROUP, TILE_GROUPS
    )
    for step in range(PER_SPLIT):
        t = first + step
        in_k = t < tiles  # past the end: x and scales load as zeros, so the tile adds nothing
        chunk = halves_ptr + row_halves[:, None] + t * (16 * BK) + depth[None, :]
        low = tl.load(chunk, mask=(out_ok & in_k)[:, None])  # [BN, 16] int16: words 0-7 of the row
        high = low
        if CHUNKS == 2:
            high = tl.load(chunk + 16, mask=(out_ok & in_k)[:, None])  # words 8-15
        # the next tile's scales and offsets now, so their latency hides behind this tile's work
        next_scales, next_neg_offsets = _group_params(
            scale_ptr, offset_ptr, t + 1, tiles, outs, out_ok, N_PAD, BK, GROUP, TILE_GROUPS
        )
        for g in tl.static_range(TILE_GROUPS):
            neg_offset = _pick(neg_offsets, g, TILE_GROUPS).to(tl.bfloat16)[:, None]  # exact: small integers
            dot = tl.zeros((BN, BM), dtype=tl.float32)
            for i in tl.static_range(PRODUCTS):  # product g * PRODUCTS + i (spelled out: a name is no constexpr)
                ks = t * BK + (g * PRODUCTS + i) * 16 + depth
                xt = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=row_ok[None, :] & in_k, other=0.0)
                if (g * PRODUCTS + i) % CHUNKS == 0:
                    w = _unpack(low, neg_offset, (g * PRODUCTS + i) // CHUNKS, UNPACK)
                else:
                    w = _unpack(high, neg_offset, (g * PRODUCTS + i) // CHUNKS, UNPACK)
                if INTERPRET:  # the CPU interpreter multiplies bf16 tiles as their raw bits: give it fp32 (exact)
                    dot += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
                else:
                    dot = tl.dot(w, xt, dot)  # [BN, BM]: sum of (q - zp) x
            acc += _pick(scales, g, TILE_GROUPS)[:, None] * dot
        scales, neg_offsets = next_scales, next_neg_offsets
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
    halves_ptr, scale_ptr, offset_ptr, w_ptr, N, N_PAD, K, GROUP: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """One 64-row block by one K tile in plain Triton (memory-bound: the bf16 writes cost more than any unpack)."""
    block, t = tl.program_id(0), tl.program_id(1)
    CHUNKS: tl.constexpr = BK // 64
    outs = block * 64 + tl.arange(0, 64)
    kt = tl.arange(0, BK)  # K in the tile: of product p = kt // 16, half 16 (p % CHUNKS) + kt % 16, nibble p // CHUNKS
    p = kt // 16
    half = (p % CHUNKS) * 16 + kt % 16
    row_ptrs = halves_ptr + (block * (K // BK) + t) * (16 * BK) + tl.arange(0, 64) * (BK // 4)
    u = (tl.load(row_ptrs[:, None] + half[None, :]).to(tl.int32) >> (4 * (p // CHUNKS))[None, :]) & 15
    if GROUP >= BK:  # one group: its scales and offsets once per row
        per_group = (t * BK // GROUP) * N_PAD + outs[:, None]
    else:
        per_group = ((t * BK + kt) // GROUP)[None, :] * N_PAD + outs[:, None]
    scale = tl.load(scale_ptr + per_group).to(tl.float32)
    offset = tl.load(offset_ptr + per_group).to(tl.float32)
    w = ((u + 128).to(tl.float32) - offset) * scale
    tl.store(w_ptr + outs[:, None] * K + (t * BK + kt)[None, :], w.to(tl.bfloat16), mask=(outs < N)[:, None])


def decode_launch(x: torch.Tensor, weight: W4Weight, config: DecodeConfig, unpack: int) -> torch.Tensor:
    """``x @ w.T`` in bf16 for bf16 ``x`` [rows <= 32, K] on one configuration (bench/kernels.py times several)."""
    rows = x.shape[0]
    tiles = weight.in_features // weight.block_k
    if not 1 <= config.split_k <= tiles:
        raise ValueError(f"split_k {config.split_k} is not between 1 and the {tiles} K tiles")
    if rows > 32:
        raise ValueError(f"the W4 decode kernel takes at most 32 rows, got {rows}")
    block_m = block_rows(rows)
    n, n_pad, k = weight.out_features, weight.padded_out, weight.in_features
    y = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    part = torch.empty(
        config.split_k if config.split_k > 1 else 0, n_pad, block_m, dtype=torch.float32, device=x.device
    )
    grid = (triton.cdiv(n_pad, config.block_n), config.split_k)
    torch.library.wrap_triton(_decode_kernel)[grid](
        x, weight.words.view(torch.int16), weight.scale, weight.offset, y, part, weight.count, rows, n, n_pad, k,
        GROUP=weight.group_size, BK=weight.block_k, TILE_GROUPS=max(1, weight.block_k // weight.group_size),
        BN=config.block_n, BM=block_m, SPLIT=config.split_k, PER_SPLIT=triton.cdiv(tiles, config.split_k),
        UNPACK=unpack, INTERPRET=INTERPRETED, num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    return y


def dequantize_launch(weight: W4Weight) -> torch.Tensor:
    """The bf16 weight [N, K], ``(q - zp) * s`` rounded once (the reference's numbers)."""
    n, k = weight.out_features, weight.in_features
    w = torch.empty(n, k, dtype=torch.bfloat16, device=weight.words.device)
    torch.library.wrap_triton(_dequantize_kernel)[(weight.padded_out // TILE_N, k // weight.block_k)](
        weight.words.view(torch.int16), weight.scale, weight.offset, w, n, weight.padded_out, k,
        GROUP=weight.group_size, BK=weight.block_k, num_warps=4,
    )  # fmt: skip
    return w


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count (132 where there are none: the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


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
    config = decode_config(out_features, weight.in_features, weight.block_k, x.shape[0], multiprocessors(x.device))
    return decode_launch(x, weight, config, unpack)


@torch.library.triton_op("quantflow::w4a16_dequantize", mutates_args={})
def w4a16_dequantize(
    words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, out_features: int, group_size: int
) -> torch.Tensor:
    """The weight in bf16 [N, K] for the prefill path's cuBLAS product."""
    return dequantize_launch(_weight(words, scale, offset, scale, out_features, group_size))


def self_check(device: torch.device) -> int | str:
    """LOP3 when its product gives the plain one's numbers bit for bit, else PLAIN; a string when even the plain kernels
    disagree with the reference. Run once per device on a random weight (with a split-K that runs short), so a GPU or
    Triton build that lowers the kernels or pairs the inline PTX's elements differently is found here instead of as
    wrong numbers."""
    from quantflow.kernels.w4_pack import dequantize, repack

    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (192, 640), generator=generator, dtype=torch.int8)
    scale = (torch.rand(192, 5, generator=generator) + 0.5).to(torch.bfloat16)
    zero_point = torch.randint(-8, 8, (192, 5), generator=generator)
    weight = repack(q.to(device), scale.to(device), zero_point.to(device), 128)
    x = torch.randn(5, 640, generator=generator).to(device, torch.bfloat16)
    config = DecodeConfig(split_k=2)  # 5 tiles: splits of 3 and 2
    dense = dequantize(weight).float()
    expected, slack = x.float() @ dense.t(), x.float().abs() @ dense.abs().t() * 2**-8  # + the weight's rounding
    try:
        plain = decode_launch(x, weight, config, PLAIN)
        right = ((plain.float() - expected).abs() <= expected.abs() * 2**-8 + slack).all()
        right = right and torch.equal(dequantize_launch(weight), dequantize(weight))
    except Exception as error:  # noqa: BLE001 - any failure to build or run means: no kernel here
        return f"the W4 kernels failed to run here ({type(error).__name__})"
    if not right:
        return "the W4 kernels disagreed with the dequantized reference on this GPU"
    try:
        same = torch.equal(decode_launch(x, weight, config, LOP3), plain)
    except Exception:  # noqa: BLE001 - the inline PTX does not build here: the plain unpack runs
        return PLAIN
    return LOP3 if same else PLAIN
