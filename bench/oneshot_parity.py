"""Do quantflow's GPTQ and AWQ artifacts match a direct ``llmcompressor.oneshot`` run?

For each method this runs (1) quantflow's quantize step and (2) a hand-written oneshot call
with the same model, the same calibration token ids and the same recipe spelled out here
with llm-compressor's own classes, then evaluates both saved folders with the same protocol
and prints the perplexity gap. It also times both quantizations (the ratio is the overhead
of quantflow's wrapper).

    .venv/bin/python bench/oneshot_parity.py --out bench/results/parity.json        # demo model, CPU
    python bench/oneshot_parity.py --model /path/to/model                             # any model, GPU

Writes JSON and prints a table. Acceptance: |gap| <= 0.5% perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.direct import direct_oneshot  # noqa: E402


def main() -> None:
    from quantflow import pipeline
    from quantflow.devtools.demo import demo_spec
    from quantflow.evaluation.runtime import Subject
    from quantflow.infra.resources import compute_dtype
    from quantflow.inputs.calibration import load_samples
    from quantflow.pipeline import steps
    from quantflow.spec import apply_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--methods", default="gptq,awq", help="which of the demo spec's variants to compare")
    parser.add_argument("--work", type=Path, default=Path("bench/results/parity-work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/parity.json"))
    args = parser.parse_args()

    spec = demo_spec(args.work / "quantflow")
    chosen = [v for v in spec.variants if v.method in args.methods.split(",")]
    spec = apply_overrides(
        spec,
        {
            "model.source": args.model,
            "evaluation.speed": None,
            "variants": [v.model_dump(mode="json") for v in chosen],
            "output.cache_dir": str(args.work / "cache"),
        },
    )
    plan = pipeline.plan(spec)
    calibration, baseline = steps.calibrate(plan), steps.evaluate_baseline(plan)
    samples = load_samples(calibration.record)
    compute = compute_dtype(plan.device, spec.model.dtype)
    rows = []
    for variant in spec.variants:
        ours = steps.evaluate(plan, variant, steps.quantize(plan, variant, calibration.record), baseline)
        folder = args.work / f"direct-{variant.method}"
        direct_seconds, _ = direct_oneshot(plan.model.path, variant, samples, compute, spec.model.dtype, folder)
        subject = Subject(name=f"direct-{variant.method}", model_path=str(folder))
        theirs, _ = steps.evaluate_subject_once(
            plan, f"direct-{variant.method}-{time.time_ns()}", subject, baseline.key
        )
        gap = 100 * (ours.evaluation.perplexity / theirs.perplexity - 1)
        rows.append(
            {
                "method": variant.method,
                "quantflow_ppl": ours.evaluation.perplexity,
                "direct_ppl": theirs.perplexity,
                "gap_pct": round(gap, 3),
                "quantflow_seconds": ours.quantize.seconds,
                "direct_seconds": round(direct_seconds, 2),
                "time_ratio": round(ours.quantize.seconds / direct_seconds, 3),
            }
        )
    result = {
        "model": args.model,
        "device": plan.device,
        "baseline_ppl": baseline.evaluation.perplexity,
        "calibration": calibration.record.model_dump(exclude={"path"}),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"baseline ppl {baseline.evaluation.perplexity:.4f} on {plan.device}")
    print("method  quantflow_ppl  direct_ppl  gap%    quantflow_s  direct_s")
    for r in rows:
        print(
            f"{r['method']:<7} {r['quantflow_ppl']:<14.4f} {r['direct_ppl']:<11.4f} {r['gap_pct']:<+7.3f} "
            f"{r['quantflow_seconds']:<12.1f} {r['direct_seconds']:.1f}"
        )


if __name__ == "__main__":
    main()
