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
import time
from pathlib import Path

import torch


def direct_oneshot(model_path: str, variant, samples: list[torch.Tensor], compute: str, dtype: str, out: Path) -> float:
    """The llm-compressor call a user would write by hand; returns its wall seconds."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, compute))
    weights = QuantizationArgs(num_bits=variant.bits, type="int", symmetric=variant.symmetric, strategy="group",
                               group_size=variant.group_size, scale_dtype=getattr(torch, dtype), observer=variant.observer)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if variant.method == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=variant.block_size,
                               dampening_frac=variant.dampening_frac, actorder=variant.actorder)]
    else:
        recipe = [AWQModifier(n_grid=variant.n_grid, duo_scaling=variant.duo_scaling),
                  QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    data = Dataset.from_dict({"input_ids": [s.tolist() for s in samples], "attention_mask": [[1] * len(s) for s in samples]})
    if not torch.accelerator.is_available():  # the same CPU workaround quantflow applies (pinning needs an accelerator)
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=data, num_calibration_samples=len(samples),
            max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.to(getattr(torch, dtype)).save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return seconds


def main() -> None:
    from quantflow import pipeline, steps
    from quantflow.calibration import load_samples
    from quantflow.demo import demo_spec
    from quantflow.resources import compute_dtype
    from quantflow.spec import apply_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--methods", default="gptq,awq", help="which of the demo spec's variants to compare")
    parser.add_argument("--work", type=Path, default=Path("bench/results/parity-work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/parity.json"))
    args = parser.parse_args()

    spec = demo_spec(args.work / "quantflow")
    chosen = [v for v in spec.variants if v.method in args.methods.split(",")]
    spec = apply_overrides(spec, {"model.source": args.model, "evaluation.speed": None,
                                  "variants": [v.model_dump(mode="json") for v in chosen],
                                  "output.cache_dir": str(args.work / "cache")})
    plan = pipeline.plan(spec)
    stage = pipeline.baseline_and_calibration(plan)
    samples = load_samples(stage.calibration)
    compute = compute_dtype(plan.device, spec.model.dtype)
    rows = []
    for variant in spec.variants:
        ours = pipeline.branch(plan, variant, stage.calibration)
        folder = args.work / f"direct-{variant.method}"
        direct_seconds = direct_oneshot(plan.model.path, variant, samples, compute, spec.model.dtype, folder)
        theirs, _ = steps.evaluate(plan.cache, f"direct-{variant.method}", f"direct-{variant.method}-{time.time_ns()}", spec,
                                   str(folder), plan.device, None, plan.baseline_key())
        gap = 100 * (ours.evaluation.perplexity / theirs.perplexity - 1)
        rows.append({"method": variant.method, "quantflow_ppl": ours.evaluation.perplexity, "direct_ppl": theirs.perplexity,
                     "gap_pct": round(gap, 3), "quantflow_seconds": ours.quantize.seconds, "direct_seconds": round(direct_seconds, 2),
                     "time_ratio": round(ours.quantize.seconds / direct_seconds, 3)})
    result = {"model": args.model, "device": plan.device, "baseline_ppl": stage.baseline.perplexity,
              "calibration": stage.calibration.model_dump(exclude={"path"}), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"baseline ppl {stage.baseline.perplexity:.4f} on {plan.device}")
    print("method  quantflow_ppl  direct_ppl  gap%    quantflow_s  direct_s")
    for r in rows:
        print(f"{r['method']:<7} {r['quantflow_ppl']:<14.4f} {r['direct_ppl']:<11.4f} {r['gap_pct']:<+7.3f} "
              f"{r['quantflow_seconds']:<12.1f} {r['direct_seconds']:.1f}")


if __name__ == "__main__":
    main()
