"""Candidates for the FP8 decode step's MLP at one row: SiLU·mul and the activation scaling moved into kernels.

The step now runs gate/up as one GEMV (``quantflow.evaluation.fp8_gemv``), then three Inductor kernels for SiLU·mul
and the per-token e4m3 scaling of its output (a split reduction for the maximum, its final pass, the scaling), then
the down GEMV: 4.6 µs a layer between the two GEMVs (bench/results/profile-fp8-7b-h200.json). The candidates:
  - ``gate_up``: each program multiplies the same outputs of gate and of up (two accumulators), writes SiLU(gate)·up
    in bf16 and the maximum of its tile's magnitudes, one per row, to a small buffer (no atomics: nothing to zero);
  - fused (``candidate``): ``gate_up``, then a down kernel that reduces that buffer to the row's scale and scales
    the bf16 row to e4m3 as it streams the weight: two kernels where the step has five;
  - split: ``gate_up``, one kernel that scales the row to e4m3 from the buffer (``scaled``), the step's down GEMV.
Times them at 7B's MLP shape (4096 -> 2 x 11008 -> 4096) in CUDA-graph replays over weight copies past 4x the L2
cache, against the current path compiled as the decode harness compiles it, and checks each output against it.
Measured on the H200 (bench/results/fp8-mlp-h200.json): current 46.9 µs, fused 61.9 (its down kernel 37.5 against
the GEMV's 17.1: scaling tiles in the weight loop stalls the stream), split 43.8 (``gate_up`` 24.7 against the
GEMV's 24.1, ``scaled`` 1.7).

    python3 bench/fp8_mlp.py --out $OUT/fp8-mlp-h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.fp8_gemv import activation, copies_for  # noqa: E402
from quantflow.evaluation.fp8 import E4M3, E4M3_MAX  # noqa: E402
from quantflow.evaluation.fp8_gemv import fp8_gemv  # noqa: E402

BLOCK_M = 16
GRID = {"block_n": (16, 32, 64), "stages": (3, 4, 5)}


@triton.jit
def _gate_up_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, h_ptr, partial_ptr, M, I, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, outs = tl.arange(0, BLOCK_M), pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, out_mask = rows < M, outs < I
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None], other=0.0)
        w_gate = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=out_mask[:, None], other=0.0)
        w_up = tl.load(w_ptr + (outs + I)[:, None] * K + ks[None, :], mask=out_mask[:, None], other=0.0)
        gate = tl.dot(x, tl.trans(w_gate), gate)
        up = tl.dot(x, tl.trans(w_up), up)
    x_scale = tl.load(x_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    gate = gate * x_scale * tl.load(w_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    up = up * x_scale * tl.load(w_scale_ptr + I + outs, mask=out_mask, other=0.0)[None, :]
    h = (gate * tl.sigmoid(gate) * up).to(tl.bfloat16)
    mask = row_mask[:, None] & out_mask[None, :]
    tl.store(h_ptr + rows[:, None] * I + outs[None, :], h, mask=mask)
    peak = tl.max(tl.where(mask, tl.abs(h.to(tl.float32)), 0.0), axis=1)
    tl.store(partial_ptr + pid * BLOCK_M + rows, peak)


@triton.jit
def _row_scale(partial_ptr, P, rows, row_mask, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """Each row's e4m3 scale from the maxima ``gate_up`` left, one per program and row."""
    parts = tl.arange(0, BLOCK_P)
    peaks = tl.load(
        partial_ptr + parts[:, None] * BLOCK_M + rows[None, :], mask=(parts < P)[:, None] & row_mask[None, :], other=0.0
    )
    return tl.maximum(tl.max(peaks, axis=0), 1e-12) / 448.0


@triton.jit
def _down_kernel(
    h_ptr, partial_ptr, P, w_ptr, w_scale_ptr, y_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, outs = tl.arange(0, BLOCK_M), pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, out_mask = rows < M, outs < N
    scale = _row_scale(partial_ptr, P, rows, row_mask, BLOCK_M, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        x = tl.clamp(h / scale[:, None], -448.0, 448.0).to(tl.float8e4nv)
        w = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=out_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    y = acc * scale[:, None] * tl.load(w_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * N + outs[None, :], y, mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _scale_kernel(
    h_ptr, partial_ptr, P, q_ptr, scale_ptr, M, K,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, ks = tl.arange(0, BLOCK_M), pid * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    scale = _row_scale(partial_ptr, P, rows, row_mask, BLOCK_M, BLOCK_P)
    mask = row_mask[:, None] & (ks < K)[None, :]
    h = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(
        q_ptr + rows[:, None] * K + ks[None, :], tl.clamp(h / scale[:, None], -448.0, 448.0).to(tl.float8e4nv), mask
    )
    if pid == 0:
        tl.store(scale_ptr + rows, scale, mask=row_mask)


def scaled(h: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` in e4m3 and its fp32 per-row scales [rows, 1], from the row maxima ``gate_up`` left: one kernel."""
    rows, inter = h.shape
    q = torch.empty(rows, inter, dtype=E4M3, device=h.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=h.device)
    _scale_kernel[(triton.cdiv(inter, 1024),)](
        h, partial, partial.shape[0], q, scale, rows, inter,
        BLOCK_M=BLOCK_M, BLOCK_P=triton.next_power_of_2(partial.shape[0]), BLOCK_K=1024, num_warps=4,
    )  # fmt: skip
    return q, scale


def gate_up(xq, x_scale, w_gate_up, s_gate_up, block_n: int, stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate)·up in bf16 [rows, inter] and each program's row maxima [programs, 16]."""
    rows, hidden = xq.shape
    inter = w_gate_up.shape[0] // 2
    if hidden % 256 or inter % 256:  # the loops read whole 256-wide tiles (7B: 4096 and 11008)
        raise ValueError(f"widths must be multiples of 256, got {hidden} and {inter}")
    programs = triton.cdiv(inter, block_n)
    h = torch.empty(rows, inter, dtype=torch.bfloat16, device=xq.device)
    partial = torch.empty(programs, BLOCK_M, dtype=torch.float32, device=xq.device)
    _gate_up_kernel[(programs,)](
        xq, x_scale, w_gate_up, s_gate_up, h, partial, rows, inter, hidden,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=256, num_warps=4, num_stages=stages,
    )  # fmt: skip
    return h, partial


def down(h: torch.Tensor, partial: torch.Tensor, w_down: torch.Tensor, s_down: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, out] of the down product, ``h`` scaled to e4m3 in the kernel by the maxima in ``partial``."""
    rows, inter = h.shape
    hidden = w_down.shape[0]
    y = torch.empty(rows, hidden, dtype=torch.float32, device=h.device)
    _down_kernel[(triton.cdiv(hidden, 32),)](
        h, partial, partial.shape[0], w_down, s_down, y, rows, hidden, inter,
        BLOCK_M=BLOCK_M, BLOCK_N=32, BLOCK_K=256, BLOCK_P=triton.next_power_of_2(partial.shape[0]),
        num_warps=4, num_stages=5,
    )  # fmt: skip
    return y


def candidate(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down, block_n: int, stages: int) -> torch.Tensor:
    """The fused pair: fp32 [rows, out] of down(SiLU(gate)·up), e4m3 ``xq`` of at most 16 rows."""
    return down(*gate_up(xq, x_scale, w_gate_up, s_gate_up, block_n, stages), w_down, s_down)


def split(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down, block_n: int, stages: int) -> torch.Tensor:
    """``gate_up``, the scaling kernel, then the step's own down GEMV."""
    return fp8_gemv(*scaled(*gate_up(xq, x_scale, w_gate_up, s_gate_up, block_n, stages)), w_down, s_down)


def current(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down) -> torch.Tensor:
    """The step's path: gate/up GEMV, SiLU·mul and the per-token scaling in torch (Inductor fuses them), down GEMV."""
    gate, up = fp8_gemv(xq, x_scale, w_gate_up, s_gate_up).to(torch.bfloat16).chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    scale = h.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    hq = (h.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return fp8_gemv(hq, scale, w_down, s_down)


def weights(out_features: int, in_features: int, copies: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    fp8 = [(torch.randn(out_features, in_features, device="cuda") * 64).to(E4M3) for _ in range(copies)]
    return fp8, torch.rand(1, out_features, device="cuda") * 1e-3


def time_pairs(call, pairs: list) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(lambda: [call(*pair) for pair in pairs], rep=50) * 1e3 / len(pairs)


def halves(xq, x_scale, pairs: list, s_gate_up, s_down, block_n: int, stages: int) -> dict:
    """Each half alone, the candidate's and the step's GEMV, to tell which half the fusion slows."""
    h, partial = gate_up(xq, x_scale, pairs[0][0], s_gate_up, block_n, stages)
    hq, h_scale = h.to(E4M3), torch.ones(h.shape[0], 1, device=h.device)
    times = {
        "split": time_pairs(lambda g, d: split(xq, x_scale, g, s_gate_up, d, s_down, block_n, stages), pairs),
        "scaled": time_pairs(lambda g, d: scaled(h, partial), pairs),
        "gate_up_candidate": time_pairs(lambda g, d: gate_up(xq, x_scale, g, s_gate_up, block_n, stages), pairs),
        "gate_up_gemv": time_pairs(lambda g, d: fp8_gemv(xq, x_scale, g, s_gate_up), pairs),
        "down_candidate": time_pairs(lambda g, d: down(h, partial, d, s_down), pairs),
        "down_gemv": time_pairs(lambda g, d: fp8_gemv(hq, h_scale, d, s_down), pairs),
    }
    return {name: round(us, 2) for name, us in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hidden, inter = args.hidden, args.intermediate
    copies = copies_for(3 * hidden * inter)
    gate_ups, s_gate_up = weights(2 * inter, hidden, copies)
    downs, s_down = weights(hidden, inter, copies)
    pairs = list(zip(gate_ups, downs, strict=True))
    _, x_scale, xq = activation(1, hidden)
    compiled = torch.compile(current)
    reference = compiled(xq, x_scale, gate_ups[0], s_gate_up, downs[0], s_down)
    result = {"card": torch.cuda.get_device_name(), "hidden": hidden, "intermediate": inter, "copies": copies}
    result["current_us"] = round(time_pairs(lambda g, d: compiled(xq, x_scale, g, s_gate_up, d, s_down), pairs), 2)
    result["candidates"] = []
    for block_n, stages in itertools.product(*GRID.values()):
        run = lambda g, d, n=block_n, s=stages: candidate(xq, x_scale, g, s_gate_up, d, s_down, n, s)  # noqa: E731
        try:
            error = (run(*pairs[0]) - reference).norm() / reference.norm()
        except triton.runtime.errors.OutOfResources:  # tiles times stages past the shared memory
            continue
        row = {"block_n": block_n, "stages": stages, "rel_error": round(error.item(), 6)}
        row["us"] = round(time_pairs(run, pairs), 2)
        result["candidates"].append(row)
        print(json.dumps(row), flush=True)
    best = min(result["candidates"], key=lambda row: row["us"])
    result["parts_us"] = halves(xq, x_scale, pairs, s_gate_up, s_down, best["block_n"], best["stages"])
    (g, d), config = pairs[0], (best["block_n"], best["stages"])
    y = split(xq, x_scale, g, s_gate_up, d, s_down, *config)
    result["split_rel_error"] = round(((y - reference).norm() / reference.norm()).item(), 6)
    print(json.dumps({k: v for k, v in result.items() if k != "candidates"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
