"""Quantization time and GPU memory: quantflow's quantize step vs a direct ``llmcompressor.oneshot``.

Builds a random-weight Llama of a real shape, one calibration set through quantflow's calibrate
step (pydoc corpus, chunked to ``--seq-len`` tokens), then for each method alternates, per repeat,
quantflow's quantize step (a fresh cache each time, so it really runs) and the hand-written
oneshot call of ``bench/direct.py`` with the same recipe and the same token ids. Both run in a
fresh spawned process; both times are taken, the oneshot call alone and the whole step (process
start, load, oneshot, save). Ratios are of medians.

    python bench/quantize_speed.py --shape 1.1b --methods gptq,awq --out $OUT/quantize-1.1b.json
    python bench/quantize_speed.py --shape 7b --methods gptq --gpu-memory-gb 8 --no-direct --out $OUT/quantize-7b.json

With ``--gpu-memory-gb`` quantflow's step runs under that cap (the run spec's ``gpu_memory_gb``).
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
from bench.direct import direct_oneshot  # noqa: E402
from bench.models import SHAPES, build_baseline  # noqa: E402


def quantflow_step(plan, variant, calibration, cache_dir: Path, budget: float | None, batch: int | None) -> dict:
    from quantflow.pipeline import steps

    update = {"gpu_memory_gb": budget, "calibration_batch_size": batch}
    fresh = plan.model_copy(update={"cache_root": str(cache_dir), "spec": plan.spec.model_copy(update=update)})
    start = time.perf_counter()
    quantized = steps.quantize(fresh, variant, calibration)
    assert not quantized.step.cached
    record = quantized.record
    return {
        "oneshot_s": record.seconds,
        "step_s": round(time.perf_counter() - start, 2),
        "peak_memory_mb": record.peak_memory_mb,
        "calibration_batch": fresh.resources.calibration_batch,
    }


def direct_step(model_path: str, variant, calibration, out: Path) -> dict:
    from quantflow.infra.steps import isolated
    from quantflow.inputs.calibration import load_samples

    start = time.perf_counter()
    seconds, peak = isolated(
        "direct", None, direct_oneshot, model_path, variant, load_samples(calibration), "bfloat16", "bfloat16", out
    )
    return {"oneshot_s": round(seconds, 2), "step_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak}


def median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=None)
    parser.add_argument(
        "--calibration-batch", type=int, default=None, help="calibration_batch_size (default: quantflow's own)"
    )
    parser.add_argument(
        "--no-direct", action="store_true", help="time quantflow's step only (e.g. the memory-budget run)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantflow-quantize"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantize.json"))
    args = parser.parse_args()

    from quantflow import pipeline
    from quantflow.infra.environment import environment
    from quantflow.pipeline import steps
    from quantflow.spec import RunSpec, variant_for

    folder = args.work / f"{args.shape}-bf16"
    if not (folder / "config.json").exists():
        build_baseline(folder, args.shape)
        torch.cuda.empty_cache()
    variants = [variant_for(m, group_size=args.group_size) for m in args.methods.split(",")]
    spec = RunSpec.model_validate(
        {
            "model": {"source": str(folder)},
            "device": "cuda",
            "variants": variants,
            "calibration": {"num_samples": args.samples, "seq_len": args.seq_len},
            "output": {"cache_dir": str(args.work / "cache")},
        }
    )
    plan = pipeline.plan(spec, progress=lambda _: None)
    calibration = steps.calibrate(plan).record
    result = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "environment": environment(),
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "gpu_memory_gb": args.gpu_memory_gb,
        "calibration": calibration.model_dump(exclude={"path"}),
        "methods": [],
    }
    print(
        f"{args.shape}, {calibration.samples} x <= {calibration.max_len} tokens ({calibration.tokens} in all) on "
        f"{result['card']}"
    )
    for variant in spec.variants:
        ours, theirs = [], []
        for repeat in range(args.repeats):
            order = ["quantflow", "direct"] if repeat % 2 == 0 else ["direct", "quantflow"]
            for who in order if not args.no_direct else ["quantflow"]:
                if who == "quantflow":
                    ours.append(
                        quantflow_step(
                            plan,
                            variant,
                            calibration,
                            args.work / f"cache-{variant.name}-{repeat}-{time.time_ns()}",
                            args.gpu_memory_gb,
                            args.calibration_batch,
                        )
                    )
                else:
                    theirs.append(direct_step(str(folder), variant, calibration, args.work / f"direct-{variant.name}"))
                print(f"  {variant.name} {who}: {(ours if who == 'quantflow' else theirs)[-1]}", flush=True)
        row = {
            "method": variant.name,
            "recipe": variant.model_dump(mode="json"),
            "quantflow": ours,
            "direct": theirs,
            "quantflow_oneshot_s": median(ours, "oneshot_s"),
            "quantflow_step_s": median(ours, "step_s"),
            "quantflow_peak_memory_mb": median(ours, "peak_memory_mb"),
        }
        if theirs:
            row |= {
                "direct_oneshot_s": median(theirs, "oneshot_s"),
                "direct_step_s": median(theirs, "step_s"),
                "direct_peak_memory_mb": median(theirs, "peak_memory_mb"),
                "oneshot_ratio": round(row["quantflow_oneshot_s"] / median(theirs, "oneshot_s"), 3),
                "step_ratio": round(row["quantflow_step_s"] / median(theirs, "step_s"), 3),
            }
        result["methods"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print("method  quantflow oneshot/step s  direct oneshot/step s  ratio oneshot/step  peak GPU MiB quantflow/direct")
    for r in result["methods"]:
        print(
            f"{r['method']:<7} {r['quantflow_oneshot_s']:>8.1f} / {r['quantflow_step_s']:<8.1f}      "
            f"{r.get('direct_oneshot_s', float('nan')):>8.1f} / {r.get('direct_step_s', float('nan')):<8.1f}  "
            f"{r.get('oneshot_ratio', float('nan')):.3f} / {r.get('step_ratio', float('nan')):.3f}      "
            f"{r['quantflow_peak_memory_mb']:.0f} / {r.get('direct_peak_memory_mb', float('nan')):.0f}"
        )


if __name__ == "__main__":
    main()
