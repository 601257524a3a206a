"""FP8 few-row product speed per Linear shape: quantflow's Triton GEMV vs ``torch._scaled_mm`` vs bf16.

For the fused decoder Linears of the 1.1B and 7B Llama shapes and one to four rows, times the product
alone with ``triton.testing.do_bench_cudagraph`` (captured in a CUDA graph and replayed, as the decode
harness runs it). Each timed call runs over enough copies of the weight to pass 4x the L2 cache, so
every weight comes from HBM as in a decode step. Prints microseconds per layer and the fraction of the
card's bandwidth, for the chosen configuration (``gemv_config``) and the best of a small grid.

    python3 bench/fp8_gemv.py --out $OUT/fp8-gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.gemv import SHAPES  # noqa: E402

GRID = {"block_n": (16, 32, 64), "block_k": (256, 512), "stages": (3, 5), "split_k": (1, 2), "warps": (2, 4)}


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // nbytes))


def time_per_layer(call, weights: list) -> float:
    """Microseconds for one layer: one replay walks every copy of the weight."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(lambda: [call(w) for w in weights], rep=30) * 1e3 / len(weights)


def layer_copies(out_features: int, in_features: int) -> tuple[list, list, torch.Tensor]:
    """Copies of one random Linear, enough to pass 4x the L2 cache: dense fp32, e4m3 scaled per output channel,
    and the first copy's scales as [1, out] (every copy is timed with them)."""
    from quantflow.kernels.e4m3 import E4M3, E4M3_MAX

    dense = [
        torch.randn(out_features, in_features, device="cuda") * 0.02
        for _ in range(copies_for(out_features * in_features))
    ]
    scales = [w.abs().amax(1, keepdim=True) / E4M3_MAX for w in dense]
    fp8 = [(w / s).to(E4M3) for w, s in zip(dense, scales, strict=True)]
    return dense, fp8, scales[0].reshape(1, -1).contiguous()


def activation(rows: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random bf16 activation, its per-row fp32 scales and its e4m3 values, as the FP8 runtime scales it."""
    from quantflow.kernels.e4m3 import E4M3, E4M3_MAX

    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    x_scale = x.float().abs().amax(-1, keepdim=True) / E4M3_MAX
    return x, x_scale, (x.float() / x_scale).to(E4M3)


def add_bandwidth(row: dict, peak: float) -> None:
    """Each ``*_us`` time of ``row`` as a fraction of the card's bandwidth (bf16 reads two bytes a weight), rounded."""
    for key in [k for k in row if k.endswith("_us")]:
        size = row["out"] * row["in"] * (2 if key == "bf16_us" else 1)
        row[key.replace("_us", "_bandwidth_fraction")] = round(size / row[key] / 1e-6 / peak, 3)
        row[key] = round(row[key], 2)


def write(out: Path | None, results: list[dict]) -> None:
    if out:
        out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": results}, indent=1))


def main() -> None:
    from quantflow.evaluation.decode import bandwidth
    from quantflow.kernels.fp8_gemv import GemvConfig, gemv_config, launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--shapes", default="1.1b-fused,7b-fused,7b")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    peak, results = bandwidth(), []
    layers = sorted({layer for shape in args.shapes.split(",") for layer in SHAPES[shape]})
    for out_features, in_features in layers:
        dense, fp8, w_scale = layer_copies(out_features, in_features)
        bf16 = [w.to(torch.bfloat16) for w in dense]
        del dense
        for rows in (int(r) for r in args.rows.split(",")):
            x, x_scale, xq = activation(rows, in_features)
            reference = (xq.float() * x_scale) @ (fp8[0].float() * w_scale.t()).t()
            row = {"out": out_features, "in": in_features, "rows": rows, "copies": len(fp8)}
            row["bf16_us"] = time_per_layer(lambda w: x @ w.t(), bf16)
            row["scaled_mm_us"] = time_per_layer(
                lambda w: torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16), fp8
            )
            chosen = gemv_config(out_features, in_features)
            error = (launch(xq, x_scale, fp8[0], w_scale, chosen) - reference).norm() / reference.norm()
            row["gemv_rel_error"] = round(error.item(), 6)
            row["gemv_us"] = time_per_layer(lambda w, c=chosen: launch(xq, x_scale, w, w_scale, c), fp8)
            row["gemv_config"] = chosen.__dict__
            best = None
            for values in () if rows > 1 else itertools.product(*GRID.values()):
                config = GemvConfig(**dict(zip(GRID, values, strict=True)))
                if in_features % (config.block_k * config.split_k):
                    continue
                try:
                    launch(xq, x_scale, fp8[0], w_scale, config)
                except triton.runtime.errors.OutOfResources:  # tiles times stages past the shared memory
                    continue
                us = time_per_layer(lambda w, c=config: launch(xq, x_scale, w, w_scale, c), fp8)
                if best is None or us < best[0]:
                    best = (us, config)
            if best:  # the grid is searched at one row, decode's batch 1
                row["best_us"], row["best_config"] = best[0], best[1].__dict__
            add_bandwidth(row, peak)
            results.append(row)
            print(json.dumps(row), flush=True)
    write(args.out, results)


if __name__ == "__main__":
    main()
