"""Does the measured allocation win on a model it was not tuned on? Uniform GPTQ, then mixed GPTQ at three budgets
with the measured allocation and with the llama.cpp-style rule, and how well each sensitivity proxy ranks layers.

    python bench/mixed_allocation.py --spec examples/smollm2-135m-mixed.yaml --budgets 0.15 0.3 0.5 \
        --out bench/results/mixed-allocation-smollm2-cpu.json

Plans the spec (its model, calibration set, evaluation protocol and first mixed variant's menu, group size and
symmetry), then in one process:

1. uniform W4 GPTQ (the start), its perplexity and its dequantized weights;
2. the direct measure (the reference): starting from the uniform GPTQ weights, each group alone moved to W8, the KL
   from the unquantized model it removes, on ``--direct-tokens`` calibration tokens;
3. the Fisher proxy on three weight errors: layer-wise GPTQ's (each Linear solved alone on the unquantized model's
   activations: what a run uses), the uniform GPTQ run's own (needs that run first), round-to-nearest's (the earlier
   proxy); each group's gain from W4 to W8, and Spearman's rank correlation of each with the direct gains;
4. per budget (bits per weight above uniform): mixed GPTQ with the measured allocation and with ``allocation: rule``,
   their perplexities;
5. per ``--embedding-targets`` value (bits per weight over the Linears and the embedding table): the input embedding
   and lm_head on the menu too (``--embedding-menu``; W6 and a tied table's per-copy options among them), the
   allocation, its perplexity and its size against bf16 (from the stored bits); with ``--artifact``, the artifact saved,
   loaded as a run's evaluation loads it, and evaluated again.
Everything is written to ``--out`` as it is measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples/smollm2-135m-mixed.yaml")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.15, 0.3, 0.5])
    parser.add_argument("--direct-tokens", type=int, default=1024)
    parser.add_argument(
        "--embedding-targets", type=float, nargs="*", default=[], help="bits per weight with embeddings on the menu"
    )
    parser.add_argument(
        "--embedding-menu", nargs="*", default=["w4", "w8", "bf16"], help="the embeddings' menu with those targets"
    )
    parser.add_argument(
        "--artifact", type=Path, help="save each embeddings row's artifact here, load it as a run does and evaluate it"
    )
    parser.add_argument("--samples", type=int, help="calibration samples (default: the spec's)")
    parser.add_argument("--seq-len", type=int, help="calibration sample length (default: the spec's)")
    parser.add_argument("--windows", type=int, help="evaluation windows (default: the spec's)")
    parser.add_argument("--skip-start-proxy", action="store_true", help="no Fisher on the uniform run's own errors")
    parser.add_argument("--bf16-ppl", type=float, help="the baseline's perplexity, when measured before")
    parser.add_argument("--direct-stride", type=int, default=1, help="rank every k-th group only")
    parser.add_argument("--only-budgets", action="store_true", help="allocations only (no uniform run, no ranking)")
    parser.add_argument(
        "--measure",
        choices=["fisher", "direct"],
        default="fisher",
        help="what the measured allocations use: the Fisher proxy, or the direct measure as a run computes it",
    )
    parser.add_argument("--skip-rule", action="store_true", help="no allocation: rule (measured before)")
    parser.add_argument("--skip-ranking", action="store_true", help="the uniform run, but no ranking of the proxies")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantflow.evaluation.evaluate import eval_tokens, score, window_span
    from quantflow.inputs.calibration import load_samples
    from quantflow.inputs.corpus import evaluation_documents
    from quantflow.pipeline import steps
    from quantflow.pipeline.planning import plan
    from quantflow.quantization import mixed, sensitivity
    from quantflow.quantization.direct import measure_direct
    from quantflow.quantization.quantize import calibration_data, mixed_recipe, recipe_for
    from quantflow.quantization.targets import input_embedding, mixed_groups
    from quantflow.spec import GPTQVariant, MixedVariant, load_spec

    torch.manual_seed(0)
    spec = load_spec(args.spec)
    calibrate = {k: v for k, v in (("num_samples", args.samples), ("seq_len", args.seq_len)) if v}
    windows = {"max_windows": args.windows} if args.windows else {}
    spec = spec.model_copy(
        update={
            "calibration": spec.calibration.model_copy(update=calibrate),
            "evaluation": spec.evaluation.model_copy(update=windows),
        }
    )
    planned = plan(spec, progress=lambda _: None)
    variant = next(v for v in planned.variants if isinstance(v, MixedVariant))
    group_size = planned.schemes[variant.name].group_size
    calibration = steps.calibrate(planned).record
    samples = load_samples(calibration)
    path = planned.model.path
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    ids = eval_tokens(evaluation_documents(spec.calibration, spec.evaluation), tokenizer)
    span, bos = window_span(spec.evaluation, base, tokenizer)
    result: dict = {
        "spec": str(args.spec),
        "model": spec.model.source,
        "group_size": group_size,
        "calibration": f"{calibration.samples} samples of up to {spec.calibration.seq_len} tokens",
        "evaluation": f"{spec.evaluation.max_windows} windows of {spec.evaluation.window} tokens",
        "measure": args.measure,
    }

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    def perplexity(model) -> float:
        return round(math.exp(score(model, ids, spec.evaluation, span, bos, None, None)[0]), 4)

    def gptq(recipe) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        oneshot(
            model=model,
            recipe=recipe,
            shuffle_calibration_samples=False,
            log_dir=None,
            **calibration_data(calibration, 1),
        )
        return model.eval(), round(time.perf_counter() - start, 1)

    groups = mixed_groups(base, variant, group_size)
    uniform_bits = mixed.effective_bits(groups, {g.name: "w4" for g in groups})
    result["uniform"] = {"bits": round(uniform_bits, 4)}
    if not args.only_budgets:
        result["bf16"] = args.bf16_ppl or perplexity(base)
        print("bf16", result["bf16"], flush=True)
        uniform = GPTQVariant(group_size=group_size, symmetric=variant.symmetric, ignore=variant.ignore)
        quantized, seconds = gptq(recipe_for(uniform, group_size, "float32"))
        start_weights = {n: quantized.get_submodule(n).weight.detach().clone() for g in groups for n in g.layers}
        result["uniform"].update(ppl=perplexity(quantized), gptq_seconds=seconds)
        del quantized
        print("uniform", result["uniform"], flush=True)
        save()

    menu = dict.fromkeys([*variant.options, *(args.embedding_menu if args.embedding_targets else [])])
    options = {
        o: sensitivity.weight_args(o, group_size, variant.symmetric, variant.observer) for o in menu if o != "bf16"
    }
    if args.measure == "direct":
        variant = variant.model_copy(update={"sensitivity": "direct"})
    full = sensitivity.measurement_samples(samples, variant.measured_tokens())
    if (
        args.measure == "direct"
    ):  # the product's own measure: a uniform GPTQ pass, then one forward per group and option
        setup = (variant, group_size, calibration, planned.resources)
        proxy, result["direct"] = measure_direct(base, groups, full, options, setup)
        spent = result["direct"]["seconds"] + result["direct"]["scoring_seconds"]
        result["direct"].update(
            tokens=sum(s.numel() for s in full), cost_vs_gptq=round(spent / result["direct"]["seconds"], 3)
        )
        print("direct", result["direct"], flush=True)
        result["direct"]["scores"] = proxy
        save()
    clock = time.perf_counter()
    if args.measure == "fisher":
        layerwise = sensitivity.gptq_errors(base, groups, samples, options, variant)
        proxy = sensitivity.fisher_scores(base, groups, full, options, errors=layerwise)
        del layerwise
        result["fisher_seconds"] = round(time.perf_counter() - clock, 1)
        print("fisher seconds", result["fisher_seconds"], flush=True)
    if not args.only_budgets and not args.skip_ranking:
        result["sensitivity"] = ranked(args, base, groups, proxy, start_weights, options, samples, full, F, torch)
        print({k: v for k, v in result["sensitivity"].items() if k != "groups"}, flush=True)
        save()

    result["embeddings"] = []
    for target in args.embedding_targets:  # the input embedding and lm_head on the menu too
        budgeted = variant.model_copy(update={"target_bits": target, "embeddings": args.embedding_menu})
        every = mixed_groups(base, budgeted, group_size)
        outer = [g for g in every if g.name not in proxy]
        clock = time.perf_counter()
        found = sensitivity.gptq_errors(base, outer, samples, options, variant)
        scores = {**proxy, **sensitivity.fisher_scores(base, outer, full, options, errors=found)}
        del found
        outer_seconds = round(time.perf_counter() - clock, 1)
        chosen = mixed.allocate(every, scores, target)
        precision = mixed.precision_by_layer(every, chosen)
        embedding = input_embedding(base)
        model, seconds = gptq(mixed_recipe(budgeted, precision, group_size, "float32", embedding))
        if precision[embedding] != "bf16":  # RTN writes the table at save; the bench evaluates the model in memory
            kept = base.get_submodule(embedding).weight
            model.get_submodule(embedding).weight.data = sensitivity.fake_quantized(kept, options[precision[embedding]])
        stored = sum(g.bits[chosen[g.name]] * g.weights for g in every)
        menu = sum(g.weights for g in every)
        total = sum(p.numel() for p in base.parameters())  # a tied table once
        row = {
            "target_bits": target,
            "bits": round(stored / menu, 4),
            "size_vs_bf16": round((stored + 16 * (total - menu)) / (16 * total), 4),
            "ppl": perplexity(model),
            "gptq_seconds": seconds,
            "embedding_sensitivity_seconds": outer_seconds,
            "embeddings": {g.name: {"chosen": chosen[g.name], "score": scores[g.name]} for g in outer},
            "counts": mixed.option_counts(precision),
        }
        if args.artifact:
            row["artifact"] = artifact_check(model, tokenizer, args.artifact / f"emb-{target}", perplexity)
        del model
        print("embeddings", target, {k: v for k, v in row.items() if k != "embeddings"}, row["embeddings"], flush=True)
        result["embeddings"].append(row)
        save()

    result["budgets"] = []
    for extra in args.budgets:
        target = round(uniform_bits + extra, 4)
        row = {"extra_bits": extra, "target_bits": target}
        allocations = [("measured", mixed.allocate(groups, proxy, target))]
        if not args.skip_rule:
            allocations.append(("rule", mixed.rule_allocation(groups, target, variant.name)))
        for label, chosen in allocations:
            precision = mixed.precision_by_layer(groups, chosen)
            budgeted = variant.model_copy(update={"target_bits": target})
            model, seconds = gptq(mixed_recipe(budgeted, precision, group_size, "float32"))
            row[label] = {
                "bits": round(mixed.effective_bits(groups, chosen), 4),
                "ppl": perplexity(model),
                "gptq_seconds": seconds,
                "counts": mixed.option_counts(precision),
                "promoted": sorted(n for n, o in chosen.items() if o != "w4"),
            }
            del model
            print(extra, label, {k: v for k, v in row[label].items() if k != "promoted"}, flush=True)
        result["budgets"].append(row)
        save()


def artifact_check(model, tokenizer, folder: Path, perplexity) -> dict:
    """The model saved as a run saves it (bf16, compressed-tensors), loaded as a run's evaluation loads it, evaluated:
    what a user gets, beside the in-memory model's perplexity."""
    import torch

    from quantflow.evaluation.evaluate import load_for_eval
    from quantflow.reporting.bits import artifact_bits

    model.to(torch.bfloat16).save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    loaded, _ = load_for_eval(str(folder), "cpu", "float32")
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"path": str(folder), "safetensors_bytes": stored, "bits": artifact_bits(folder), "ppl": perplexity(loaded)}


def ranked(args, base, groups, proxy, start_weights, options, samples, full, F, torch) -> dict:
    """Spearman's rho of each proxy's W4-to-W8 gains against the direct measure, over every ``--direct-stride``-th
    group that can take both options."""
    from quantflow.quantization import sensitivity

    names = [g.name for g in groups if "w8" in g.bits and "w4" in g.bits][:: args.direct_stride]
    chosen = [g for g in groups if g.name in names]
    start_proxy = proxy  # stands in when --skip-start-proxy leaves it out
    if not args.skip_start_proxy:
        errors = sensitivity.start_errors(base, chosen, options, start_weights)
        start_proxy = sensitivity.fisher_scores(base, chosen, full, options, errors=errors)
    rtn = sensitivity.fisher_scores(base, chosen, full, options)
    direct = direct_gains(base, chosen, start_weights, options, samples, args.direct_tokens, F, torch)
    gain = lambda scores: [scores[n]["w4"] - scores[n]["w8"] for n in names]  # noqa: E731
    rho = lambda scores: round(sensitivity.rank_correlation(gain(scores), direct["gains"]), 4)  # noqa: E731
    return {
        "groups_ranked": len(names),
        "direct_tokens": args.direct_tokens,
        "spearman_fisher_layerwise_gptq_vs_direct": rho(proxy),
        "spearman_fisher_start_gptq_vs_direct": None if args.skip_start_proxy else rho(start_proxy),
        "spearman_fisher_rtn_vs_direct": rho(rtn),
        "direct_seconds": direct["seconds"],
        "direct_start_kl": direct["start_kl"],
        "groups": {
            n: {"fisher_layerwise_gptq": p, "fisher_start_gptq": s, "fisher_rtn": r, "direct": d}
            for n, p, s, r, d in zip(names, gain(proxy), gain(start_proxy), gain(rtn), direct["gains"], strict=True)
        },
    }


def direct_gains(base, groups, start_weights, options, samples, tokens, F, torch) -> dict:
    """KL from the unquantized model that each group removes when it alone moves from the uniform GPTQ weights to W8."""
    from quantflow.quantization.sensitivity import fake_quantized, measurement_samples

    clock = time.perf_counter()
    batches = [s.unsqueeze(0) for s in measurement_samples(samples, tokens)]
    with torch.no_grad():
        reference = [F.log_softmax(base(b).logits[0].float(), dim=-1) for b in batches]
        original = {n: base.get_submodule(n).weight.data for n in start_weights}
        model = copy.deepcopy(base)
        for name, weight in start_weights.items():
            model.get_submodule(name).weight.data = weight.clone()

        def kl() -> float:
            total = sum(
                F.kl_div(F.log_softmax(model(b).logits[0].float(), dim=-1), r, log_target=True, reduction="sum").item()
                for b, r in zip(batches, reference, strict=True)
            )
            return total / sum(b.numel() for b in batches)

        start_kl, gains = kl(), []
        for group in groups:
            if "w8" not in group.bits or "w4" not in group.bits:
                continue
            for name in group.layers:
                model.get_submodule(name).weight.data = fake_quantized(original[name], options["w8"])
            gains.append(start_kl - kl())
            for name in group.layers:
                model.get_submodule(name).weight.data = start_weights[name]
    return {"start_kl": round(start_kl, 5), "gains": gains, "seconds": round(time.perf_counter() - clock, 1)}


if __name__ == "__main__":
    main()
