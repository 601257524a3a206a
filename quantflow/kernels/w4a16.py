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
PTX ``lop3`` (the magic-number trick the layout is built for), two 16-bit outputs per asm call. Both spread each word
over its 8 K values (a reshape, which Triton lowers through shared memory). The ``SUBDOT`` forms avoid the reshape:
they take nibble position p of every word of the tile as one [BN, 16] operand (K values 8j + p) and multiply it by
the matching strided rows of x, eight products of depth 16 per 128-wide tile; ``SUBDOT_LOP3`` makes each bf16 pair
from two words with ``prmt`` + ``lop3``. The PTX forms run on CUDA only and are checked against the plain ones by
``self_check`` at first use and by tests/gpu/test_w4a16_cuda.py. Groups of 32 and 64 use the one-product forms.

Prefill (``w4a16_dequantize``): the same unpack writes ``(q - zp) * s`` in bf16; ``quantflow.kernels.linear`` then
calls cuBLAS, which beats any hand-written product at thousands of rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantflow.kernels.w4_pack import TILE_N, W4Weight

PLAIN, LOP3, SUBDOT, SUBDOT_LOP3 = 0, 1, 2, 3
FORMS = {PLAIN: "plain", LOP3: "lop3", SUBDOT: "sub-dots plain", SUBDOT_LOP3: "sub-dots lop3"}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    split_k: int = 8
    warps: int = 2
    stages: int = 3


def decode_config(out_features: int, in_features: int, block_k: int) -> DecodeConfig:
    """Blocks after a sweep on an H200 at 7B shapes (bench/kernels.py): 64 outputs per program, 4 warps, and enough K
    splits for about 1,000 programs (7.6 per SM): the largest split up to that which divides the K tiles."""
    block_n = 64
    tiles, wanted = in_features // block_k, round(1000 / triton.cdiv(out_features, block_n))
    split = max(s for s in range(1, tiles + 1) if tiles % s == 0 and s <= max(wanted, 1))
    return DecodeConfig(block_n, split, 4)


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
def _subdot_operand(words, p: tl.constexpr, UNPACK: tl.constexpr):
    """bf16 [BN, W] of 128 + u at nibble position ``p`` (bit 4 (p // 2) + 16 (p % 2)) of every word: K values
    ``8j + p``. Elementwise, so the words' register layout carries over to the dot operand without a reshape."""
    shifted = words >> (4 * (p // 2)) if p >= 2 else words
    if UNPACK == 2:
        return (((shifted >> (16 * (p % 2))) & 15) + 128).to(tl.float32).to(tl.bfloat16)
    # two words per asm call: prmt gathers their low (or high) halves, lop3 makes the bf16 pair
    selector: tl.constexpr = "0x5410" if p % 2 == 0 else "0x7632"
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; prmt.b32 t, $1, $2, " + selector + "; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
        "=r,r,r", [shifted], dtype=tl.bfloat16, is_pure=True, pack=2,
    )  # fmt: skip


@triton.jit
def _tile_dot(words_ptr, x_ptr, row_ptrs, out_ok, rows, row_ok, k0, K, BN: tl.constexpr, BK: tl.constexpr,
              BM: tl.constexpr, UNPACK: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """(sum over the tile of (128 + u) x [BN, BM], sum of x [BM]) in fp32 for one K tile starting at ``k0``."""
    if UNPACK >= 2:  # eight products of depth BK / 8, one per nibble position (BK = 128: depth 16)
        W: tl.constexpr = BK // 8
        words = tl.load(row_ptrs[:, None] + tl.arange(0, W)[None, :], mask=out_ok[:, None])
        dot = tl.zeros((BN, BM), dtype=tl.float32)
        x_sum = tl.zeros((BM,), dtype=tl.float32)
        for p in tl.static_range(8):
            ks = k0 + 8 * tl.arange(0, W) + p
            xt = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=row_ok[None, :], other=0.0)  # [W, BM]
            w = _subdot_operand(words, p, UNPACK)
            if INTERPRET:  # the CPU interpreter multiplies bf16 tiles as their raw bits: give it fp32 (exact here)
                dot = tl.dot(w.to(tl.float32), xt.to(tl.float32), dot, input_precision="ieee")
            else:
                dot = tl.dot(w, xt, dot)
            x_sum += tl.sum(xt.to(tl.float32), axis=0)
        return dot, x_sum
    ks = k0 + tl.arange(0, BK)
    xt = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=row_ok[None, :], other=0.0)  # [BK, BM]
    w = _load_unpacked(row_ptrs, out_ok, BN, BK, UNPACK)
    if INTERPRET:
        dot = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
    else:
        dot = tl.dot(w, xt)
    return dot, tl.sum(xt.to(tl.float32), axis=0)


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
    first = pid_k * PER_SPLIT  # PER_SPLIT * SPLIT = tiles (decode_config); a constant trip count pipelines best
    row_words = (outs // 64) * (tiles * 64 * W) + (outs % 64) * W  # [BN]: the row's first word in tile 0
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for step in range(PER_SPLIT):
        t = first + step
        row_ptrs = words_ptr + row_words + t * (64 * W)
        dot, x_sum = _tile_dot(
            words_ptr, x_ptr, row_ptrs, out_ok, rows, row_ok, t * BK, K, BN, BK, BM, UNPACK, INTERPRET
        )
        group = t * BK // GROUP
        scale = tl.load(scale_ptr + group * N_PAD + outs, mask=out_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + group * N_PAD + outs, mask=out_ok, other=0.0).to(tl.float32)
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
    w = (_load_unpacked(row_ptrs, outs >= 0, 64, BK, UNPACK % 2).to(tl.float32) - offset[:, None]) * scale[:, None]
    ks = t * BK + tl.arange(0, BK)
    tl.store(w_ptr + outs[:, None] * K + ks[None, :], w.to(tl.bfloat16), mask=(outs < N)[:, None])


def decode_launch(x: torch.Tensor, weight: W4Weight, config: DecodeConfig, unpack: int) -> torch.Tensor:
    """``x @ w.T`` in bf16 for bf16 ``x`` [rows <= 32, K] on one configuration (bench/kernels.py times several)."""
    rows = x.shape[0]
    if unpack >= SUBDOT and weight.block_k != 128:  # sub-dots need depth 16: the same unpack in one product per tile
        unpack %= 2
    if weight.in_features // weight.block_k % config.split_k:
        raise ValueError(f"split_k {config.split_k} does not divide the {weight.in_features // weight.block_k} K tiles")
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
        PER_SPLIT=k // weight.block_k // config.split_k,
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
    """The first unpack form, fastest first, whose unpack gives the plain one's integers exactly and whose decode
    product agrees with the plain one's to bf16 rounding (the order of fp32 sums may differ), on a random weight: a
    GPU or Triton build that lowers the inline PTX differently, or not at all, is found here, once, instead of as
    wrong numbers. A string says why even the plain form failed."""
    from quantflow.kernels.w4_pack import dequantize, repack

    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (192, 512), generator=generator, dtype=torch.int8)
    scale = torch.rand(192, 4, generator=generator) + 0.5
    zero_point = torch.randint(-8, 8, (192, 4), generator=generator)
    weight = repack(q.to(device), scale.to(device), zero_point.to(device), 128)
    unit = repack(q.to(device), torch.ones_like(scale).to(device), None, 128)
    x = torch.randn(5, 512, generator=generator).to(device, torch.bfloat16)
    config = DecodeConfig(split_k=2)
    try:
        plain = decode_launch(x, weight, config, PLAIN)
        if not torch.equal(dequantize_launch(weight, PLAIN), dequantize(weight)):
            return "the plain W4 unpack kernel disagreed with the reference on this GPU"
    except Exception as error:  # noqa: BLE001 - any failure to build or run means: no kernel here
        return f"the W4 kernels failed to run here ({type(error).__name__})"
    for form in (SUBDOT_LOP3, LOP3, SUBDOT):
        try:
            exact = torch.equal(dequantize_launch(unit, form).to(torch.int8), q.to(device))
            y = decode_launch(x, weight, config, form)
        except Exception:  # noqa: BLE001, S112 - this PTX form does not build here: try the next
            continue
        if exact and ((y.float() - plain.float()).abs() <= plain.float().abs() * 2**-7 + 1e-3).all():
            return form
    return PLAIN
