"""Int4 GEMV kernel speed per layer shape: GemLite and fbgemm vs PyTorch's tinygemm vs dense bf16.

For each Linear shape of the 1.1B and 7B Llama shapes (and their q+k+v and gate+up fused into one
Linear), and batch 1 and 8, times one call with
``triton.testing.do_bench_cudagraph`` (the call captured in a CUDA graph and replayed, as the
decode harness runs it; median of the replays) and prints microseconds and the achieved
fraction of the card's bandwidth (bytes of weights, scales and zeros read once).

    python3 bench/gemv.py --out $OUT/gemv.json

GemLite (``gemlite==0.6.0.post2``, an sdist: ``pip wheel --no-deps`` it into ``.whl/``) is required;
fbgemm-gpu-genai (``fbgemm-gpu-genai==1.6.0``, cp312, built for CUDA 13) is timed when installed.
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
    # q, k and v as one Linear, gate and up as one (as vLLM's qkv_proj and gate_up_proj)
    "1.1b-fused": [(3072, 2048), (11264, 2048)],
    "7b-fused": [(12288, 4096), (22016, 4096)],
}


def gemlite_layer(unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.nn.Module:
    """GemLite's A16W4 layer for w = (u - 8) * scale + zero; GemLite dequantizes (u - z) * scale, so z = 8 - zero /
    scale."""
    from gemlite.helper import A16W4_HQQ_INT

    return A16W4_HQQ_INT(device="cuda", dtype=torch.bfloat16).from_weights(
        unsigned.to(torch.uint8), scale, 8 - zero / scale
    )


class FbgemmLinear(torch.nn.Module):
    """fbgemm-gpu-genai's CUTLASS mixed-input GEMM (``bf16i4bf16_shuffled``), used by torchao's "preshuffled" int4.

    Its bf16 variant dequantizes ``w = (u - 8) * scale + zero`` per group, tinygemm's convention, so the
    same values go in unchanged; it needs groups of at least 128.
    """

    def __init__(self, unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super().__init__()
        from fbgemm_gpu.experimental.gen_ai.quantize import pack_int4

        packed, scale_t = torch.ops.fbgemm.preshuffle_i4(
            pack_int4((unsigned - 8).to(torch.int8)), scale.t().contiguous().to(torch.bfloat16)
        )
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale_t)
        self.register_buffer("zero", zero.t().contiguous().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fbgemm.bf16i4bf16_shuffled(x, self.packed, self.scale, self.zero)


def optional_kernels(
    unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> dict[str, torch.nn.Module]:
    """Kernels from packages the GPU machine may lack (carried wheels): timed where installed."""
    kernels = {}
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm)
    except ImportError as error:
        print(f"fbgemm-gpu-genai not timed: {error}", flush=True)
    else:
        if group_size >= 128:
            kernels["fbgemm-shuffled"] = FbgemmLinear(unsigned, scale, zero)
    return kernels


def main() -> None:
    from triton.testing import do_bench_cudagraph

    from quantflow.evaluation.decode import bandwidth
    from quantflow.evaluation.int4 import Int4Linear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    peak, rows = bandwidth(), []
    for shape in args.shapes.split(","):
        layers = SHAPES[shape]
        for out_features, in_features in layers:
            unsigned = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, device="cuda")
            scale = torch.rand(out_features, in_features // args.group_size, device="cuda") * 0.01 + 0.002
            zero = torch.randn_like(scale) * 0.01
            kernels = {
                "gemlite": gemlite_layer(unsigned, scale, zero),
                "tinygemm": Int4Linear.from_unsigned(
                    unsigned, scale, zero, args.group_size, None, torch.device("cuda")
                ).pack(),
                **optional_kernels(unsigned, scale, zero, args.group_size),
                "bf16": torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16),
            }
            int4_bytes = out_features * in_features // 2 + 2 * scale.numel() * 2
            dense = (unsigned - 8) * scale.repeat_interleave(args.group_size, 1) + zero.repeat_interleave(
                args.group_size, 1
            )
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
                    row[name] = {
                        "us": round(us, 2),
                        "bandwidth_fraction": round(size / us / 1e-6 / peak, 3) if peak else None,
                        "rel_error": round(error, 4),
                    }
                rows.append(row)
                print(
                    f"{shape} {out_features}x{in_features} b{batch}: "
                    + ", ".join(
                        f"{n} {row[n]['us']:.1f} us ({row[n]['bandwidth_fraction']}, err {row[n]['rel_error']})"
                        for n in kernels
                    ),
                    flush=True,
                )
    if args.out:
        args.out.write_text(
            json.dumps({"card": torch.cuda.get_device_name(), "group_size": args.group_size, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
