"""A few-row FP8 product for decode: e4m3 weights streamed once, per-token e4m3 activations, fp32 accumulation.

Why hand-written: at one to a few rows ``torch._scaled_mm`` (cuBLASLt's row-wise FP8 GEMM) is tuned for many rows
and reads an e4m3 weight at about a third of the card's bandwidth, so an FP8 decode step was no faster than bf16's
(docs/benchmarks.md); Inductor's own reduction for the same product was slower still. This image carries no FP8
GEMV kernel (vLLM's and FBGEMM's are not installable here). The maths is the FP8 runtime's: the same e4m3
activations and scales, products summed in fp32, only the order of the sums differs.

The kernel is a Triton op (``torch.library.triton_op``), so ``torch.compile`` and CUDA graphs see through it.
Each program multiplies e4m3 tiles on the tensor cores (``tl.dot``), the rows padded to 16: Triton
software-pipelines the loads that feed a ``tl.dot`` (several tiles in flight), which plain loads summed on the CUDA
cores did not get, and that read the weight at 0.70-0.79 of the bandwidth instead of 0.61-0.71 on the wide layers
(bench/results/fp8-gemv-dot-h200.json). With ``split_k`` above one, slices of the input width meet through fp32 atomic adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # the smallest tile tl.dot takes: the rows (at most 16) padded with zeros


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    warps: int = 4
    stages: int = 5


def gemv_config(out_features: int, in_features: int) -> GemvConfig:
    """The blocks the per-layer benchmark liked best on an H200 (bench/results/fp8-gemv-dot-h200.json): 32 outputs
    by 256 inputs with deep pipelining, 64 outputs with shallower pipelining on the widest layers (gate/up)."""
    if out_features >= 16384:
        return GemvConfig(block_n=64, stages=3)
    return GemvConfig()


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, y_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, out_mask = rows < M, outs < N
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    start = pid_k * span
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, tl.minimum(start + span, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_mask, w_mask = row_mask[:, None], out_mask[:, None]
        if not EVEN_K:
            x_mask, w_mask = x_mask & (ks < K)[None, :], w_mask & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    x_scale = tl.load(x_scale_ptr + rows, mask=row_mask, other=0.0)
    y = acc * x_scale[:, None] * tl.load(w_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    mask = row_mask[:, None] & out_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + rows[:, None] * N + outs[None, :], y, mask=mask)
    else:
        tl.atomic_add(y_ptr + rows[:, None] * N + outs[None, :], y, mask=mask, sem="relaxed")


def launch(
    x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, config: GemvConfig
) -> torch.Tensor:
    """The kernel on one configuration (bench/fp8_gemv.py times several); fp32 [rows, out] for up to 16 rows."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if rows > BLOCK_M:
        raise ValueError(f"fp8_gemv takes at most {BLOCK_M} rows, got {rows}: use torch._scaled_mm")
    fill = torch.zeros if config.split_k > 1 else torch.empty
    y = fill((rows, out_features), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, config.block_n), config.split_k)
    torch.library.wrap_triton(_fp8_gemv_kernel)[grid](
        x, x_scale, weight, weight_scale, y, rows, out_features, in_features,
        BLOCK_M=BLOCK_M, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        EVEN_K=in_features % (config.block_k * config.split_k) == 0,
        num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    return y


@torch.library.triton_op("quantflow::fp8_gemv", mutates_args={})
def fp8_gemv(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``(x * x_scale) @ (weight * weight_scale).T`` in fp32 for e4m3 ``x`` [rows, in] and ``weight`` [out, in],
    fp32 ``x_scale`` [rows, 1] and ``weight_scale`` [1, out]."""
    return launch(x, x_scale, weight, weight_scale, gemv_config(weight.shape[0], x.shape[1]))
