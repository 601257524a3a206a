"""A few-row FP8 product for decode: e4m3 weights streamed once, per-token e4m3 activations, fp32 accumulation.

Why hand-written: at one to a few rows ``torch._scaled_mm`` (cuBLASLt's row-wise FP8 GEMM) is tuned for many rows
and reads an e4m3 weight at about a third of the card's bandwidth, so an FP8 decode step was no faster than bf16's
(docs/benchmarks.md); Inductor's own reduction for the same product was slower still. This image carries no FP8
GEMV kernel (vLLM's and FBGEMM's are not installable here). The maths is the FP8 runtime's: the same e4m3
activations and scales, products summed in fp32, only the order of the sums differs.

The kernel is a Triton op (``torch.library.triton_op``), so ``torch.compile`` and CUDA graphs see through it.
Each program reduces ``block_n`` output rows over a slice of the input width; with ``split_k`` above one the
slices' partial sums meet through fp32 atomic adds, which keeps the card busy on layers with few outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    warps: int = 4
    stages: int = 3


def gemv_config(out_features: int, in_features: int, programs_wanted: int = 528) -> GemvConfig:
    """Enough programs to fill the card: split the input width when there are few outputs.

    528 is four programs for each of an H100/H200's 132 SMs. Measured on an H200 (bench/fp8_decode.py, 7B
    shape, batch 1): these blocks gave 1.34x bf16's decode; the layer benchmark's per-layer best (8 outputs by
    256 inputs) gave 1.22x in the whole step, so the layer timings alone do not pick the blocks."""
    base = GemvConfig()
    programs = triton.cdiv(out_features, base.block_n)
    split = 1
    while programs * split < programs_wanted and in_features % (base.block_k * split * 2) == 0:
        split *= 2
    return GemvConfig(split_k=split)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, y_ptr, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < N
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    start = pid_k * span
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(start, tl.minimum(start + span, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + row * K + ks)
            w = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=out_mask[:, None], other=0.0)
        else:
            k_mask = ks < K
            x = tl.load(x_ptr + row * K + ks, mask=k_mask, other=0.0)
            w = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=out_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    scale = tl.load(x_scale_ptr + row) * tl.load(w_scale_ptr + outs, mask=out_mask, other=0.0)
    y = tl.sum(acc, axis=1) * scale
    if SPLIT_K == 1:
        tl.store(y_ptr + row * N + outs, y, mask=out_mask)
    else:
        tl.atomic_add(y_ptr + row * N + outs, y, mask=out_mask, sem="relaxed")


def launch(
    x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, config: GemvConfig
) -> torch.Tensor:
    """The kernel on one configuration (bench/fp8_gemv.py times several); fp32 [rows, out]."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    fill = torch.zeros if config.split_k > 1 else torch.empty
    y = fill((rows, out_features), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, config.block_n), config.split_k, rows)
    torch.library.wrap_triton(_fp8_gemv_kernel)[grid](
        x, x_scale, weight, weight_scale, y, out_features, in_features,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        EVEN_K=in_features % (config.block_k * config.split_k) == 0,
        num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    return y


@torch.library.triton_op("quantflow::fp8_gemv", mutates_args={})
def fp8_gemv(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``(x * x_scale) @ (weight * weight_scale).T`` in fp32 for e4m3 ``x`` [rows, in] and ``weight`` [out, in],
    fp32 ``x_scale`` [rows, 1] and ``weight_scale`` [1, out]."""
    return launch(x, x_scale, weight, weight_scale, gemv_config(weight.shape[0], x.shape[1]))
