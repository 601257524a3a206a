"""Candidates for the FP8 decode step's MLP at one row: SiLU·mul and the activation scaling moved into kernels.

The step now runs gate/up as one GEMV (``quantflow.kernels.fp8_gemv``), then three Inductor kernels for SiLU·mul
and the per-token e4m3 scaling of its output (a split reduction for the maximum, its final pass, the scaling), then
the down GEMV: 4.6 µs a layer between the two GEMVs (bench/results/profile-fp8-7b-h200.json). Two paths after the
runtime's gate/up kernel (``quantflow.kernels.fp8_mlp``: SiLU(gate)·up in bf16 and each tile's row maxima):
  - split, the runtime's (``FP8GatedMLP``): one kernel scales the row to e4m3 from those maxima, then the down GEMV;
  - fused: a down kernel that reduces the maxima to the row's scale and scales the bf16 row as it streams the weight.
Times them at 7B's MLP shape (4096 -> 2 x 11008 -> 4096) in CUDA-graph replays over weight copies past 4x the L2
cache, against the current path compiled as the decode harness compiles it, and checks each output against it and
against fp32 maths with no rounding after the input's (``exact``).
Measured on the H200 (bench/results/fp8-mlp-h200.json): current 47.1 µs, fused 61.9 (its down kernel 37.5 against
the GEMV's 17.1: scaling tiles in the weight loop stalls the stream), split 43.8 (``gate_up_silu`` 24.7 against the
GEMV's 24.2, ``scale_rows`` 1.7); all three 2.5% from the exact maths.

    python3 bench/fp8_mlp.py --out $OUT/fp8-mlp-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.fp8_gemv import activation, copies_for  # noqa: E402
from quantflow.kernels.fp8_gemv import BLOCK_M, fp8_gemv  # noqa: E402
from quantflow.kernels.fp8_mlp import fp8_gate_up_silu, fp8_scale_rows, row_scale  # noqa: E402


@triton.jit
def _down_kernel(
    h_ptr, partial_ptr, P, w_ptr, w_scale_ptr, y_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, outs = tl.arange(0, BLOCK_M), pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, out_mask = rows < M, outs < N
    scale = row_scale(partial_ptr, P, rows, row_mask, 448.0, BLOCK_M, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        x = tl.clamp(h / scale[:, None], -448.0, 448.0).to(tl.float8e4nv)
        w = tl.load(w_ptr + outs[:, None] * K + ks[None, :], mask=out_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    y = acc * scale[:, None] * tl.load(w_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * N + outs[None, :], y, mask=row_mask[:, None] & out_mask[None, :])


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


def fused(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down) -> torch.Tensor:
    """The runtime's gate/up kernel, then the down kernel that scales the row inside its weight loop."""
    return down(*fp8_gate_up_silu(xq, x_scale, w_gate_up, s_gate_up), w_down, s_down)


def split(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down) -> torch.Tensor:
    """The runtime's path (``quantflow.kernels.fp8.FP8GatedMLP``): gate/up kernel, scaling kernel, down GEMV."""
    return fp8_gemv(*fp8_scale_rows(*fp8_gate_up_silu(xq, x_scale, w_gate_up, s_gate_up)), w_down, s_down)


def current(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down) -> torch.Tensor:
    """The step's path: gate/up GEMV, SiLU·mul and the per-token scaling in torch (Inductor fuses them), down GEMV."""
    from quantflow.kernels.e4m3 import E4M3, E4M3_MAX
    from quantflow.kernels.fp8_gemv import fp8_gemv

    gate, up = fp8_gemv(xq, x_scale, w_gate_up, s_gate_up).to(torch.bfloat16).chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    scale = h.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    hq = (h.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return fp8_gemv(hq, scale, w_down, s_down)


def exact(xq, x_scale, w_gate_up, s_gate_up, w_down, s_down) -> torch.Tensor:
    """fp32 maths on the dequantized weights from the same e4m3 input, with SiLU·mul's output not rounded at all."""
    gate, up = ((xq.float() * x_scale) @ (w_gate_up.float() * s_gate_up.t()).t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ (w_down.float() * s_down.t()).t()


def weights(out_features: int, in_features: int, copies: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    from quantflow.kernels.e4m3 import E4M3

    fp8 = [(torch.randn(out_features, in_features, device="cuda") * 64).to(E4M3) for _ in range(copies)]
    return fp8, torch.rand(1, out_features, device="cuda") * 1e-3


def time_pairs(call, pairs: list) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(lambda: [call(*pair) for pair in pairs], rep=50) * 1e3 / len(pairs)


def halves(xq, x_scale, pairs: list, s_gate_up, s_down) -> dict:
    """Each kernel alone, against the plain GEMV of the same weights, to tell which part costs what."""
    from quantflow.kernels.e4m3 import E4M3

    h, peaks = fp8_gate_up_silu(xq, x_scale, pairs[0][0], s_gate_up)
    hq, h_scale = h.to(E4M3), torch.ones(h.shape[0], 1, device=h.device)
    times = {
        "gate_up_silu": time_pairs(lambda g, d: fp8_gate_up_silu(xq, x_scale, g, s_gate_up), pairs),
        "gate_up_gemv": time_pairs(lambda g, d: fp8_gemv(xq, x_scale, g, s_gate_up), pairs),
        "scale_rows": time_pairs(lambda g, d: fp8_scale_rows(h, peaks), pairs),
        "down_scaling_in_loop": time_pairs(lambda g, d: down(h, peaks, d, s_down), pairs),
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
    truth = exact(xq, x_scale, gate_ups[0], s_gate_up, downs[0], s_down)
    result = {"card": torch.cuda.get_device_name(), "hidden": hidden, "intermediate": inter, "copies": copies}
    for name, path in (("current", compiled), ("fused", fused), ("split", split)):
        run = lambda g, d, path=path: path(xq, x_scale, g, s_gate_up, d, s_down)  # noqa: E731
        y = run(*pairs[0])
        result[f"{name}_rel_error"] = round(((y - reference).norm() / reference.norm()).item(), 6)
        result[f"{name}_error_vs_exact"] = round(((y - truth).norm() / truth.norm()).item(), 6)
        result[f"{name}_us"] = round(time_pairs(run, pairs), 2)
    result["parts_us"] = halves(xq, x_scale, pairs, s_gate_up, s_down)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
