"""How well the Fisher estimate ranks layer groups like the measured KL, and what it saves.

    python bench/mixed_sensitivity.py --spec examples/smollm2-135m-mixed.yaml --kl-tokens 1024 \
        --out bench/results/mixed-sensitivity-smollm2-cpu.json

Plans the spec (its model, calibration set and first mixed variant), then scores every Linear group at every
menu option three ways: the measured KL (the reference: one forward pass per group and option) on ``--kl-tokens``
calibration tokens, the Fisher estimate on the same tokens, and the Fisher estimate on the variant's own
``sensitivity_tokens`` (what a run uses). Reports Spearman's rank correlation with the reference over every
(group, option) pair and over the W4 scores alone, how many of the reference's 10 most sensitive groups each
estimate also puts in its top 10, and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def agreement(reference: dict, estimate: dict) -> dict:
    from quantflow.quantization.sensitivity import rank_correlation

    pairs = [(g, o) for g, scores in reference.items() for o in scores if o != "bf16"]
    w4 = [g for g in reference if "w4" in reference[g]]
    top = lambda scores: set(sorted(w4, key=lambda g: -scores[g]["w4"])[:10])  # noqa: E731
    return {
        "spearman_all": round(
            rank_correlation([reference[g][o] for g, o in pairs], [estimate[g][o] for g, o in pairs]), 4
        ),
        "spearman_w4": round(rank_correlation([reference[g]["w4"] for g in w4], [estimate[g]["w4"] for g in w4]), 4),
        "top10_overlap": len(top(reference) & top(estimate)),
    }


def timed(function, *args) -> tuple[dict, float]:
    start = time.perf_counter()
    return function(*args), round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples/smollm2-135m-mixed.yaml")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--kl-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from quantflow.infra.environment import environment
    from quantflow.inputs.calibration import load_samples
    from quantflow.pipeline import steps
    from quantflow.pipeline.planning import plan
    from quantflow.quantization.quantize import mixed_groups
    from quantflow.quantization.sensitivity import fisher_scores, kl_scores, measurement_samples, weight_args
    from quantflow.spec import MixedVariant, load_spec

    spec = load_spec(args.spec)
    if args.cache_dir:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"cache_dir": args.cache_dir})})
    planned = plan(spec, progress=lambda _: None)
    variant = next(v for v in planned.variants if isinstance(v, MixedVariant))
    group_size = planned.schemes[variant.name].group_size
    calibration = steps.calibrate(planned).record
    model = AutoModelForCausalLM.from_pretrained(planned.model.path, dtype=torch.float32).eval().requires_grad_(False)
    groups = mixed_groups(model, variant, group_size)
    options = {
        o: weight_args(o, group_size, variant.symmetric, variant.observer) for o in variant.options if o != "bf16"
    }
    samples = load_samples(calibration)
    short, full = measurement_samples(samples, args.kl_tokens), measurement_samples(samples, variant.measured_tokens())
    kl, kl_s = timed(kl_scores, model, groups, short, options)
    fisher_short, fisher_short_s = timed(fisher_scores, model, groups, short, options)
    fisher_full, fisher_full_s = timed(fisher_scores, model, groups, full, options)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "model": spec.model.source,
        "groups": len(groups),
        "options": list(options),
        "group_size": group_size,
        "symmetric": variant.symmetric,
        "kl": {"tokens": args.kl_tokens, "seconds": kl_s},
        "fisher_same_tokens": {"tokens": args.kl_tokens, "seconds": fisher_short_s, **agreement(kl, fisher_short)},
        "fisher_run_tokens": {
            "tokens": variant.measured_tokens(),
            "seconds": fisher_full_s,
            **agreement(kl, fisher_full),
        },
        "scores": {"kl": kl, "fisher_same_tokens": fisher_short, "fisher_run_tokens": fisher_full},
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("scores", "environment")}, indent=1))


if __name__ == "__main__":
    main()
