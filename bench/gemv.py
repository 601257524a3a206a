"""Int4 GEMV kernel speed per layer shape: candidate Triton GEMVs vs PyTorch's tinygemm (quantflow's) vs dense bf16.

For each Linear shape of the 1.1B and 7B Llama shapes, and batch 1 and 8, times one call with
``triton.testing.do_bench_cudagraph`` (the call captured in a CUDA graph and replayed, as the
decode harness runs it; median of the replays) and prints microseconds and the achieved
fraction of the card's bandwidth (bytes of weights, scales and zeros read once).

    python3 bench/gemv.py --out $OUT/gemv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

SHAPES = {  # (out, in) of each decoder Linear
    "1.1b": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)],
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}


def main() -> None:
    from triton.testing import do_bench_cudagraph

    from bench.int4_gemv_candidate import CandidateLinear, InterleavedLinear
    from quantflow.decode import bandwidth
    from quantflow.int4 import Int4Linear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    peak, rows = bandwidth(), []
    for shape, layers in SHAPES.items():
        for out_features, in_features in layers:
            unsigned = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, device="cuda")
            scale = torch.rand(out_features, in_features // args.group_size, device="cuda") * 0.01
            zero = torch.randn_like(scale) * 0.01
            kernels = {"triton-candidate": CandidateLinear(unsigned, scale, zero, args.group_size),
                       "triton-interleaved": InterleavedLinear(unsigned, scale, zero, args.group_size),
                       "tinygemm": Int4Linear.from_unsigned(unsigned, scale, zero, args.group_size, None, torch.device("cuda")),
                       "bf16": torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)}
            int4_bytes = out_features * in_features // 2 + 2 * scale.numel() * 2
            dense = (unsigned - 8) * scale.repeat_interleave(args.group_size, 1) + zero.repeat_interleave(args.group_size, 1)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
                row = {"shape": shape, "out": out_features, "in": in_features, "batch": batch}
                reference = x.float() @ dense.t()
                for name, layer in kernels.items():
                    with torch.no_grad():
                        y = layer(x).float()  # also autotunes, outside the capture
                        error = ((y - reference).norm() / reference.norm()).item() if name != "bf16" else 0.0
                        us = do_bench_cudagraph(lambda: layer(x), rep=50) * 1e3
                    size = out_features * in_features * 2 if name == "bf16" else int4_bytes
                    row[name] = {"us": round(us, 2), "bandwidth_fraction": round(size / us / 1e-6 / peak, 3) if peak else None,
                                 "rel_error": round(error, 4)}
                rows.append(row)
                print(f"{shape} {out_features}x{in_features} b{batch}: " + ", ".join(f"{n} {row[n]['us']:.1f} us ({row[n]['bandwidth_fraction']}, err {row[n]['rel_error']})"
                                                                                  for n in kernels), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "group_size": args.group_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
