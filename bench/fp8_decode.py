"""FP8 W8A8 on FP8 matmuls vs bf16: logits, decode speed and peak memory on a random-weight Llama shape.

Builds the bf16 folder (bench.models), quantizes it with quantflow's own quantize step (fp8: e4m3
weights per output channel, dynamic per-token activations), then:
  - times bf16 and the FP8 runtime (``quantflow.evaluation.fp8``) in ``quantflow.evaluation.decode``'s
    harness, each in a fresh process, fused q/k/v and gate/up for both;
  - checks the FP8-matmul logits against the dequantized reference (transformers' load of the same
    artifact, activations fake-quantized by compressed-tensors) and against bf16.

    python bench/fp8_decode.py --shape 7b --out $OUT/fp8-7b.json      # on an FP8 GPU (Ada, Hopper)

Writes JSON after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.models import SHAPES, build_baseline  # noqa: E402


def quantize(baseline: Path, artifact: Path) -> dict:
    from quantflow.infra.resources import Resources
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from quantflow.spec import FP8Variant

    record = quantize_weights(
        str(baseline),
        FP8Variant(name="fp8"),
        Scheme(group_size=None),
        None,
        Resources(device="cuda"),
        artifact,
        artifact,
    )
    return {"seconds": record.seconds, "peak_memory_mb": record.peak_memory_mb, "layers": len(record.quantized_layers)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def check(artifact: Path, baseline: Path) -> dict:
    """Relative logit errors, one prompt: FP8 matmuls vs the dequantized reference, each vs bf16."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.fp8 import load_fp8

    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(1)).cuda()
    logits, one = {}, {}  # one: a single token, so every Linear sees one row, as in the compiled decode step
    for name, load in (
        ("fp8", lambda: load_fp8(artifact, "cuda")),
        ("simulated", lambda: AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.bfloat16).cuda()),
        ("bf16", lambda: AutoModelForCausalLM.from_pretrained(baseline, dtype=torch.bfloat16).cuda()),
    ):
        model = load()
        logits[name] = model(ids).logits.float().cpu()
        if name != "bf16":
            run = torch.compile(model, fullgraph=True) if name == "fp8" else model
            one[name] = run(ids[:, :1], use_cache=False).logits.float().cpu()
        del model
        torch.cuda.empty_cache()
    return {
        "fp8_compiled_one_row_vs_dequantized_reference": relative(one["fp8"], one["simulated"]),
        "fp8_vs_dequantized_reference": relative(logits["fp8"], logits["simulated"]),
        "fp8_vs_bf16": relative(logits["fp8"], logits["bf16"]),
        "dequantized_reference_vs_bf16": relative(logits["simulated"], logits["bf16"]),
    }


def measure(runtime: str, folder: str, batches: list[int], prompt_len: int, gen_len: int, repeats: int, mode: str):
    """One runtime's decode records, in a fresh process (clean peak memory)."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.decode import benchmark
    from quantflow.evaluation.fp8 import load_fp8
    from quantflow.spec import SpeedSpec

    model = (
        load_fp8(folder, "cuda")
        if runtime == "fp8"
        else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    )
    speed = SpeedSpec(
        batch_sizes=batches, prompt_len=prompt_len, gen_len=gen_len, warmup=2, repeats=repeats, compile_mode=mode
    )
    return [benchmark(model, runtime, b, speed).model_dump() for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantflow-fp8"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/fp8.json"))
    args = parser.parse_args()
    from quantflow.infra.environment import environment
    from quantflow.infra.steps import isolated

    result = {
        "environment": environment(),
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "shape": args.shape,
        "config": SHAPES[args.shape],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    baseline, artifact = args.work / f"{args.shape}-bf16", args.work / f"{args.shape}-fp8"
    start = time.perf_counter()
    build_baseline(baseline, args.shape)
    result["build_seconds"] = round(time.perf_counter() - start, 1)
    result["quantize"] = isolated("quantize", None, quantize, baseline, artifact)
    print(f"built in {result['build_seconds']} s; fp8 quantize {result['quantize']}", flush=True)
    save()
    batches = [int(b) for b in args.batches.split(",")]
    result["records"] = []
    for runtime, folder in (("bf16", baseline), ("fp8", artifact)):
        records = isolated(
            runtime,
            None,
            measure,
            runtime,
            str(folder),
            batches,
            args.prompt_len,
            args.gen_len,
            args.repeats,
            args.compile_mode,
        )
        result["records"] += records
        for r in records:
            print(
                f"{runtime} b{r['batch']} [{r['harness']}]: {r['decode_tokens_per_s']} tok/s, peak "
                f"{r['peak_memory_mb']:.0f} MiB, compile {r['compile_seconds']} s",
                flush=True,
            )
        save()
    by = {(r["runtime"], r["batch"]): r for r in result["records"]}
    result["ratios"] = {
        f"b{b}": {
            "decode_speedup": round(by[("fp8", b)]["decode_tokens_per_s"] / by[("bf16", b)]["decode_tokens_per_s"], 3),
            "peak_memory_ratio": round(by[("fp8", b)]["peak_memory_mb"] / by[("bf16", b)]["peak_memory_mb"], 3),
        }
        for b in batches
    }
    print(json.dumps(result["ratios"]), flush=True)
    save()
    result["logits"] = isolated("check", None, check, artifact, baseline)
    print(f"logits: {result['logits']}", flush=True)
    save()


if __name__ == "__main__":
    main()
