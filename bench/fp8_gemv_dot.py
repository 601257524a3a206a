"""A candidate one-row FP8 product on the tensor cores, timed against quantflow's ``fp8_gemv`` per Linear shape.

``fp8_gemv`` sums e4m3 products on the CUDA cores and reads the weight at 0.4-0.7 of an H200's bandwidth
(docs/benchmarks.md). This candidate pads the activation to 16 rows and multiplies e4m3 tiles with ``tl.dot``:
Triton software-pipelines the loads that feed a ``tl.dot`` (``num_stages`` tiles in flight, asynchronous copies),
which plain loads do not get. The padding costs tensor-core work a one-row product does not need, and nothing else.
The maths is the same: e4m3 activation and weights, fp32 sums, the two scales applied once at the end.

Prints, per shape at one row, the production kernel's time and the candidate's best over a small grid, each
checked against the reference maths before it is timed; the production kernel changes only if this wins.

    python3 bench/fp8_gemv_dot.py --out $OUT/fp8-gemv-dot.json      # on an FP8 GPU (Ada, Hopper)
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
from bench.fp8_gemv import activation, add_bandwidth, layer_copies, time_per_layer, write  # noqa: E402
from bench.gemv import SHAPES  # noqa: E402

GRID = {"block_n": (16, 32, 64), "block_k": (256, 512), "stages": (3, 4, 6), "split_k": (1, 2), "warps": (4, 8)}
BLOCK_M = 16  # the smallest tile tl.dot takes; row 0 is the activation, the rest zeros


@triton.jit
def _fp8_dot_gemv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, y_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
        w = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=outs[:, None] < N, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    scale = tl.load(x_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
    y = acc * scale * tl.load(w_scale_ptr + outs, mask=outs < N, other=0.0)[None, :]
    mask = (rows[:, None] < M) & (outs[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptr + rows[:, None] * N + outs[None, :], y, mask=mask)
    else:
        tl.atomic_add(y_ptr + rows[:, None] * N + outs[None, :], y, mask=mask, sem="relaxed")


def dot_gemv(x, x_scale, weight, weight_scale, block_n: int, block_k: int, stages: int, split_k: int, warps: int):
    """fp32 [rows, out] for e4m3 ``x`` [rows <= 16, in], ``weight`` [out, in]; the input width must divide."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    assert rows <= BLOCK_M and in_features % (block_k * split_k) == 0
    y = (torch.zeros if split_k > 1 else torch.empty)((rows, out_features), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, block_n), split_k)
    _fp8_dot_gemv_kernel[grid](
        x, x_scale, weight, weight_scale, y, rows, out_features, in_features,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def main() -> None:
    from quantflow.evaluation.decode import bandwidth
    from quantflow.evaluation.fp8_gemv import fp8_gemv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7b-fused,7b")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    peak, results = bandwidth(), []
    layers = sorted(
        {layer for shape in args.shapes.split(",") for layer in SHAPES[shape]} - {(11008, 4096)}
    )  # 7b's unfused gate
    for out_features, in_features in layers:
        _, fp8, w_scale = layer_copies(out_features, in_features)
        _, x_scale, xq = activation(1, in_features)
        reference = (xq.float() * x_scale) @ (fp8[0].float() * w_scale.t()).t()
        row = {"out": out_features, "in": in_features, "copies": len(fp8)}
        row["gemv_us"] = time_per_layer(lambda w: fp8_gemv(xq, x_scale, w, w_scale), fp8)
        best = None
        for values in itertools.product(*GRID.values()):
            config = dict(zip(GRID, values, strict=True))
            if in_features % (config["block_k"] * config["split_k"]):
                continue
            try:
                error = (dot_gemv(xq, x_scale, fp8[0], w_scale, **config) - reference).norm() / reference.norm()
            except triton.runtime.errors.OutOfResources:  # tiles times stages past the shared memory
                continue
            if not error < 1e-4:
                raise SystemExit(f"the candidate is {error.item():.2e} off the reference at {config}")
            us = time_per_layer(lambda w, c=config: dot_gemv(xq, x_scale, w, w_scale, **c), fp8)
            if best is None or us < best[0]:
                best = (us, config)
        row["dot_us"], row["dot_config"] = best
        add_bandwidth(row, peak)
        results.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, results)  # after every layer, so a run cut short keeps what it measured


if __name__ == "__main__":
    main()
