"""How well a run's sensitivity table ranks the groups, against the direct measure from that run's own uniform GPTQ.

    python bench/direct_rank.py --model /tmp/models/gemma3-270m --artifact RUN/gptq \
        --table RUN/sensitivity-mixed-4.46.json --samples CACHE/calibration/KEY/samples.safetensors \
        --tokens 1024 --group-size 128 --out bench/results/direct-rank-gemma3-cpu.json

The direct measure (``quantflow.quantization.direct.direct_scores``) starts from the finished uniform W4 GPTQ artifact
of the same run (decompressed), moves each group alone to W8 and measures the KL from the unquantized model it
removes on the first ``--tokens`` calibration tokens. The table's proxy gain is its score at W4 less its score at W8
(finer W4 groups on the table's menu are left out of both).
Reported: Spearman's rank correlation of the two over every group, and how many of the direct measure's ten largest
gains are among the proxy's ten.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from quantflow.quantization.direct import direct_scores
from quantflow.quantization.mixed import LayerGroup
from quantflow.quantization.sensitivity import measurement_samples, weight_args


def top(gains: dict[str, float], count: int = 10) -> set[str]:
    return set(sorted(gains, key=gains.get, reverse=True)[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--artifact", "--table", "--samples", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--symmetric", action="store_true")
    args = parser.parse_args()
    table = json.load(open(args.table))
    kept = ("w4", "w8", "bf16")  # the direct measure moves a group to its cheapest better option: W8 here
    groups = [
        LayerGroup(
            **{
                **{k: v for k, v in g.items() if k != "score"},
                "bits": {o: b for o, b in g["bits"].items() if o in kept},
            }
        )
        for g in table["groups"]
    ]
    proxy = {g["name"]: g["score"]["w4"] - g["score"]["w8"] for g in table["groups"]}
    tensors = load_file(args.samples)
    samples = measurement_samples([tensors[k] for k in sorted(tensors)], args.tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    dense = CompressedTensorsConfig(run_compressed=False)
    uniform = AutoModelForCausalLM.from_pretrained(args.artifact, dtype=torch.float32, quantization_config=dense)
    start = {n: uniform.get_submodule(n).weight.detach().clone() for g in groups for n in g.layers}
    del uniform
    options = {o: weight_args(o, args.group_size, args.symmetric) for o in ("w4", "w8")}
    clock = time.perf_counter()
    scores, start_kl = direct_scores(model, groups, samples, options, start)
    direct = {g.name: scores[g.name]["w4"] for g in groups}
    names = list(direct)
    result = {
        "model": args.model,
        "table_measure": table["measure"],
        "table_start": table.get("start"),
        "tokens": args.tokens,
        "groups": len(names),
        "start_kl": round(start_kl, 6),
        "seconds": round(time.perf_counter() - clock, 1),
        "spearman": round(float(spearmanr([proxy[n] for n in names], [direct[n] for n in names]).statistic), 4),
        "top10_shared": len(top(proxy) & top(direct)),
        "direct": direct,
        "proxy": proxy,
    }
    json.dump(result, open(args.out, "w"), indent=1)
    print({k: v for k, v in result.items() if k not in ("direct", "proxy")})


if __name__ == "__main__":
    main()
