"""Decode speed and memory: bf16 vs quantflow's saved W4 artifacts on int4 kernels, in one harness.

For each Llama shape (random weights: speed does not depend on their values) this builds the
bf16 model folder, quantizes it with quantflow's own quantize step (RTN, W4, group 128, with
zero points: AWQ and GPTQ write the same packed format, so they decode at the same speed), then
runs ``quantflow.evaluation.decode.benchmark`` on:
  - bf16: the baseline folder, dense;
  - W4 int4 tinygemm: the saved artifact through ``quantflow.evaluation.int4`` (packed weights, PyTorch's int4 op);
  - dense-decompressed: the same artifact as transformers loads it (compressed-tensors -> bf16);
  - FP8 W8A8 (when asked): an fp8 variant's artifact on FP8 matmuls (``quantflow.evaluation.fp8``);
  - NVFP4 W4A16 Triton (when asked): an nvfp4 variant's artifact on quantflow's FP4 decode kernel
    (``quantflow.evaluation.fp4``).
Before timing, the int4 model's logits are checked against the dequantized reference.
``--fuse both`` times each runtime with separate and with fused q/k/v and gate/up projections.

    python bench/decode.py --shapes 1.1b,7b --out $OUT/decode.json      # on a GPU machine

Prints a table; writes JSON with the card, versions and every record.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.models import SHAPES, build_baseline  # noqa: E402

W4A16 = "W4 int4 W4A16 Triton"  # quantflow.kernels' decode and prefill kernels on the same artifact
FP8 = "FP8 W8A8"  # an fp8 variant's artifact (e4m3 per channel, dynamic per-token activations) on FP8 matmuls
NVFP4 = "NVFP4 W4A16 Triton"  # an nvfp4 variant's artifact (RTN) on quantflow.kernels.fp4's decode kernel


def quantize_nvfp4(baseline: Path, artifact: Path) -> dict:
    from quantflow.infra.resources import Resources
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from quantflow.spec import FP4Variant

    variant = FP4Variant(name="nvfp4", method="nvfp4")
    record = quantize_weights(
        str(baseline), variant, Scheme(group_size=16), None, Resources(device="cuda"), artifact, artifact
    )
    return {"seconds": record.seconds, "quantized_layers": len(record.quantized_layers)}


def quantize(baseline: Path, artifact: Path, group_size: int) -> dict:
    from quantflow.infra.resources import Resources
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from quantflow.spec import RTNVariant

    variant = RTNVariant(name="rtn", group_size=group_size, symmetric=False)
    record = quantize_weights(
        str(baseline), variant, Scheme(group_size=group_size), None, Resources(device="cuda"), artifact, artifact
    )
    return {
        "seconds": record.seconds,
        "peak_memory_mb": record.peak_memory_mb,
        "quantized_layers": len(record.quantized_layers),
    }


@torch.no_grad()
def check_int4(artifact: Path) -> float:
    """Relative error of int4-kernel logits vs the dequantized dense reference, same prompt."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.int4 import load_int4, pack_all

    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(1)).cuda()
    dense = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.bfloat16).cuda()
    reference = dense(ids).logits.float()
    del dense
    torch.cuda.empty_cache()
    packed = pack_all(load_int4(artifact, "cuda"))  # the tinygemm kernel that decode times
    return ((packed(ids).logits.float() - reference).norm() / reference.norm()).item()


def measure(
    runtime: str,
    folder: str,
    batches: list[int],
    prompt_len: int,
    gen_len: int,
    repeats: int,
    tuned: bool,
    fuse: bool,
    compile_mode: str,
    compile_scope: str,
    cache_dir: str | None,
) -> list[dict]:
    """Load one runtime's model and time every batch size (run in a fresh process: clean peak memory, no leftover
    hooks). ``cache_dir`` is Inductor's cache: empty for a first compile, filled by an earlier process for a warm
    one."""
    import os

    from transformers import AutoModelForCausalLM

    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir

    if tuned:  # gpt-fast's Inductor settings: autotune tile shapes of the decode kernels (longer compile)
        torch._inductor.config.coordinate_descent_tuning = True
        torch._inductor.config.triton.unique_kernel_names = True

    from quantflow.evaluation.decode import benchmark
    from quantflow.evaluation.int4 import load_int4, pack_all
    from quantflow.spec import SpeedSpec

    if runtime.startswith("W4 int4"):
        model = load_int4(folder, "cuda")
    elif runtime == FP8:
        from quantflow.evaluation.fp8 import load_fp8

        model = load_fp8(folder, "cuda")
    elif runtime == NVFP4:
        from quantflow.evaluation.fp4 import load_fp4

        model = load_fp4(folder, "cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    if runtime == W4A16:
        pack_all(model, "w4a16")  # the harness's own pack_all then leaves the layers as they are
    return [
        benchmark(
            model,
            runtime,
            batch,
            SpeedSpec(
                batch_sizes=[batch],
                prompt_len=prompt_len,
                gen_len=gen_len,
                warmup=2,
                repeats=repeats,
                compile_mode=compile_mode,
                compile_scope=compile_scope,
            ),
            fuse=fuse,
        ).model_dump()
        for batch in batches
    ]


def run_shape(
    shape: str,
    work: Path,
    batches: list[int],
    prompt_len: int,
    gen_len: int,
    repeats: int,
    tuned: bool,
    chosen: list[str],
    fusions: list[bool],
    modes: list[str],
    scopes: list[str],
    caches: list[str],
) -> dict:
    from quantflow.infra.steps import isolated

    baseline, artifact = work / f"{shape}-bf16", work / f"{shape}-w4g128"
    start = time.perf_counter()
    build_baseline(baseline, shape)
    built = time.perf_counter() - start
    quant = isolated("quantize", None, quantize, baseline, artifact, 128)
    error = isolated("check", None, check_int4, artifact)
    print(
        f"{shape}: built in {built:.0f} s, RTN W4 g128 in {quant['seconds']} s, int4 logits rel. error {error:.4f}",
        flush=True,
    )
    if FP8 in chosen:
        from bench.fp8_decode import quantize as quantize_fp8

        isolated("quantize fp8", None, quantize_fp8, baseline, work / f"{shape}-fp8")
    if NVFP4 in chosen:
        isolated("quantize nvfp4", None, quantize_nvfp4, baseline, work / f"{shape}-nvfp4")
    runtimes = {
        FP8: work / f"{shape}-fp8",
        NVFP4: work / f"{shape}-nvfp4",
        "bf16": baseline,
        "W4 int4 tinygemm": artifact,
        W4A16: artifact,
        "W4 decompressed to bf16 by transformers": artifact,
    }
    records = []
    combos = ((n, f, m, s) for m in modes for s in scopes for f in fusions for n in chosen)
    for runtime, fuse, mode, scope in combos:
        cache_dir = tempfile.mkdtemp(prefix="inductor-") if caches != ["default"] else None
        for cache in caches:  # "cold" then "warm" share one fresh directory: the warm process finds the cold one's
            measured = isolated(
                runtime,
                None,
                measure,
                runtime,
                str(runtimes[runtime]),
                batches,
                prompt_len,
                gen_len,
                repeats,
                tuned,
                fuse,
                mode,
                scope,
                cache_dir,
            )
            records.extend({**record, "inductor_cache": cache} for record in measured)
            report(measured, cache)
    return {
        "shape": shape,
        "config": SHAPES[shape],
        "inductor_tuning": tuned,
        "quantize": quant,
        "int4_logits_rel_error": error,
        "records": records,
    }


def report(records: list[dict], cache: str) -> None:
    for record in records:
        print(
            f"  {record['runtime'] + ' [' + record['harness'] + ']':100s} b{record['batch']}: "
            f"{record['decode_tokens_per_s']:8.1f} tok/s, {record['decode_ms_per_step']:.3f} ms/step, prefill "
            f"{record['prefill_ms']:.2f} ms, peak {record['peak_memory_mb']:.0f} MiB, floor "
            f"{record['bandwidth_floor_fraction']}, compile {record['compile_seconds']} s ({cache} cache)",
            flush=True,
        )


def summary(result: dict) -> list[str]:
    """Speed-up and memory ratio of each quantized runtime vs bf16 per batch size, each against bf16 in the same
    harness (fused or not)."""
    lines = []
    by = {(r["runtime"], r["batch"], r["harness"]): r for r in result["records"]}  # the harness names fusion and mode
    for (runtime, batch, harness), record in by.items():
        if runtime != "bf16" and ("bf16", batch, harness) in by:
            base = by[("bf16", batch, harness)]
            lines.append(
                f"{result['shape']} b{batch} [{harness}]: {runtime} "
                f"{record['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x bf16 decode, "
                f"{base['prefill_ms'] / record['prefill_ms']:.2f}x bf16 prefill, peak memory "
                f"{record['peak_memory_mb'] / base['peak_memory_mb']:.2f}x; bf16 at "
                f"{base['bandwidth_floor_fraction']} of the floor; compile {base['compile_seconds']} s bf16, "
                f"{record['compile_seconds']} s quantized"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.1b,7b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tuned", action="store_true", help="Inductor coordinate-descent tuning (as gpt-fast)")
    parser.add_argument("--runtimes", default=f"bf16,W4 int4 tinygemm,{W4A16}")
    parser.add_argument(
        "--fuse",
        default="on",
        choices=["on", "off", "both"],
        help="fused q/k/v and gate/up (quantflow.evaluation.fuse) for every runtime",
    )
    parser.add_argument("--compile-modes", default="default", help="torch.compile modes, comma-separated")
    parser.add_argument("--compile-scopes", default="step", help="'layers' and/or 'step', comma-separated")
    parser.add_argument(
        "--caches",
        default="default",
        help="'default' (the user's Inductor cache), or 'cold' and/or 'warm': a fresh cache per measurement, "
        "'cold,warm' measuring a first compile and then a second process's compile from what the first left",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantflow-decode"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args()
    from quantflow.infra.environment import environment

    results = {
        "environment": environment(),
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "shapes": [],
    }
    for shape in args.shapes.split(","):
        results["shapes"].append(
            run_shape(
                shape,
                args.work,
                [int(b) for b in args.batches.split(",")],
                args.prompt_len,
                args.gen_len,
                args.repeats,
                args.tuned,
                args.runtimes.split(","),
                {"on": [True], "off": [False], "both": [False, True]}[args.fuse],
                args.compile_modes.split(","),
                args.compile_scopes.split(","),
                args.caches.split(","),
            )
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    for result in results["shapes"]:
        print("\n".join(summary(result)))


if __name__ == "__main__":
    main()
