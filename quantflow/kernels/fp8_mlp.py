"""The kernels of ``quantflow.kernels.fp8.FP8GatedMLP`` at one row: SiLU(gate)·up, then down, in three kernels.

At batch-1 decode the step ran gate/up as one FP8 GEMV, then three Inductor kernels for SiLU·mul and the per-token
e4m3 scaling of its result (a split reduction for the maximum, its last pass, the scaling: 4.6 µs a layer on an
H200, bench/results/profile-fp8-7b-h200.json), then the down GEMV. Here the gate/up kernel multiplies the same
outputs of gate and of up in each program, writes SiLU(gate)·up in bf16 and its tile's row maxima to a small
buffer (no atomics, so nothing to zero first); one kernel scales the row to e4m3 from those maxima; the down product
is ``quantflow.kernels.fp8_gemv``. Measured at 7B's shape: 43.8 µs a layer against 47.1, and the whole 7B
decode step from 1.46x to 1.51x bf16's speed (bench/results/fp8-mlp-h200.json, fp8-7b-h200-gated-mlp.json). Scaling
inside the down GEMV's weight loop instead was slower (61.9 µs).

The maths is the FP8 runtime's, except that gate and up are not rounded to bf16 before SiLU: against fp32 maths with
no activation rounding after the input's, both paths are off by 2.5% at 7B's shape (the e4m3 rounding of SiLU·mul's
output), the two within 0.2-1.7% of each other from one random draw to the next.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantflow.kernels.e4m3 import E4M3, E4M3_MAX
from quantflow.kernels.fp8_gemv import BLOCK_M

BLOCK_N = 32  # gate and up outputs per program (64 weight rows): the fastest tile at 7B's shape, 3 stages
STAGES = 3
BLOCK_K = 256
SCALE_BLOCK = 1024  # row elements per program of the scaling kernel


@triton.jit
def _gate_up_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, h_ptr, peak_ptr, M, I, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, outs = tl.arange(0, BLOCK_M), pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, out_mask = rows < M, outs < I
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_mask, w_mask = row_mask[:, None], out_mask[:, None]
        if not EVEN_K:
            x_mask, w_mask = x_mask & (ks < K)[None, :], w_mask & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=x_mask, other=0.0)
        w_gate = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
        w_up = tl.load(w_ptr + (outs + I)[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
        gate = tl.dot(x, tl.trans(w_gate), gate)
        up = tl.dot(x, tl.trans(w_up), up)
    x_scale = tl.load(x_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    gate = gate * x_scale * tl.load(w_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    up = up * x_scale * tl.load(w_scale_ptr + I + outs, mask=out_mask, other=0.0)[None, :]
    h = (gate * tl.sigmoid(gate) * up).to(tl.bfloat16)
    mask = row_mask[:, None] & out_mask[None, :]
    tl.store(h_ptr + rows[:, None] * I + outs[None, :], h, mask=mask)
    tl.store(peak_ptr + pid * BLOCK_M + rows, tl.max(tl.where(mask, tl.abs(h.to(tl.float32)), 0.0), axis=1))


@triton.jit
def row_scale(peak_ptr, P, rows, row_mask, E4M3_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """Each row's e4m3 scale from the maxima the gate/up kernel left, one per program and row."""
    tiles = tl.arange(0, BLOCK_P)
    peaks = tl.load(
        peak_ptr + tiles[:, None] * BLOCK_M + rows[None, :], mask=(tiles < P)[:, None] & row_mask[None, :], other=0.0
    )
    return tl.maximum(tl.max(peaks, axis=0), 1e-12) / E4M3_MAX


@triton.jit
def _scale_kernel(
    h_ptr, peak_ptr, P, q_ptr, scale_ptr, M, K, E4M3_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, ks = tl.arange(0, BLOCK_M), pid * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    scale = row_scale(peak_ptr, P, rows, row_mask, E4M3_MAX, BLOCK_M, BLOCK_P)
    mask = row_mask[:, None] & (ks < K)[None, :]
    h = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    q = tl.clamp(h / scale[:, None], -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None] * K + ks[None, :], q, mask=mask)
    if pid == 0:
        tl.store(scale_ptr + rows, scale, mask=row_mask)


@torch.library.triton_op("quantflow::fp8_gate_up_silu", mutates_args={})
def fp8_gate_up_silu(
    x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate)·up in bf16 [rows, inter] for e4m3 ``x`` [rows, in] (at most 16 rows) and the fused e4m3 ``weight``
    [gate; up] of [2 * inter, in], with each program's row maxima [programs, 16] for the scaling that follows."""
    rows, in_features = x.shape
    inter = weight.shape[0] // 2
    programs = triton.cdiv(inter, BLOCK_N)
    h = torch.empty(rows, inter, dtype=torch.bfloat16, device=x.device)
    peaks = torch.empty(programs, BLOCK_M, dtype=torch.float32, device=x.device)
    torch.library.wrap_triton(_gate_up_kernel)[(programs,)](
        x, x_scale, weight, weight_scale, h, peaks, rows, inter, in_features,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=in_features % BLOCK_K == 0,
        num_warps=4, num_stages=STAGES,
    )  # fmt: skip
    return h, peaks


@torch.library.triton_op("quantflow::fp8_scale_rows", mutates_args={})
def fp8_scale_rows(h: torch.Tensor, peaks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` [rows, width] in e4m3 and its fp32 per-row scales [rows, 1], the maxima read from ``peaks``."""
    rows, width = h.shape
    q = torch.empty(rows, width, dtype=E4M3, device=h.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=h.device)
    torch.library.wrap_triton(_scale_kernel)[(triton.cdiv(width, SCALE_BLOCK),)](
        h, peaks, peaks.shape[0], q, scale, rows, width, E4M3_MAX=E4M3_MAX,
        BLOCK_M=BLOCK_M, BLOCK_P=triton.next_power_of_2(peaks.shape[0]), BLOCK_K=SCALE_BLOCK, num_warps=4,
    )  # fmt: skip
    return q, scale
