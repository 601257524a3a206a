"""Int4 Linear at many rows: tinygemm's packed kernel against the plain form (dequantize to bf16, then cuBLAS).

Perplexity windows push thousands of rows through every Linear; tinygemm is built for a few. For each Linear
shape of the 7B and 1.1B Llama shapes and each row count, times one call of each form of
``quantflow.evaluation.int4.Int4Linear`` (and dense bf16 for scale): ``torch.cuda.synchronize`` around each timed
call, median of the repeats after a warm-up. It also checks the two forms agree on the output.

    python3 bench/int4_prefill.py --out $OUT/int4-prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.gemv import SHAPES  # noqa: E402


def timed(call, repeats: int) -> float:
    """Median microseconds of ``call`` over ``repeats`` synchronized runs, after three untimed ones."""
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e6)
    return round(statistics.median(samples), 1)


def layer_pair(out_features: int, in_features: int, group_size: int):
    """(plain, packed) Int4Linear of the same random weights, and the dense bf16 weight they encode."""
    from quantflow.evaluation.int4 import Int4Linear

    unsigned = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    scale = torch.rand(out_features, in_features // group_size) * 0.02 + 0.001
    zero = torch.randn(out_features, in_features // group_size) * 0.01
    device = torch.device("cuda")
    plain = Int4Linear.from_unsigned(unsigned, scale, zero, group_size, None, device)
    packed = Int4Linear.from_unsigned(unsigned, scale, zero, group_size, None, device).pack()
    return plain, packed, plain.dequantized()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7b,1.1b")
    parser.add_argument("--rows", default="16,128,512,2048")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    with torch.no_grad():
        for family in args.shapes.split(","):
            for out_features, in_features in SHAPES[family]:
                plain, packed, dense = layer_pair(out_features, in_features, args.group_size)
                for rows in rows_list:
                    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
                    a, b = plain(x).float(), packed(x).float()
                    row = {
                        "shape": family,
                        "out": out_features,
                        "in": in_features,
                        "rows": rows,
                        "tinygemm_us": timed(lambda: packed(x), args.repeats),
                        "plain_us": timed(lambda: plain(x), args.repeats),
                        "dense_bf16_us": timed(lambda: x @ dense.t(), args.repeats),
                        "forms_relative_difference": round(((a - b).norm() / b.norm()).item(), 5),
                    }
                    row["plain_speedup"] = round(row["tinygemm_us"] / row["plain_us"], 2)
                    results.append(row)
                    print(json.dumps(row), flush=True)
    from quantflow.infra.environment import environment

    record = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "group_size": args.group_size,
        "results": results,
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
