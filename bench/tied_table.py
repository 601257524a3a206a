"""Where a tied embedding table's quantization damage comes from: its input-embedding copy or its lm_head copy.

    nice -n 5 python bench/tied_table.py --spec examples/gemma3-270m-mixed.yaml --samples 8 --seq-len 256 \
        --windows 4 --out bench/results/tied-table-gemma3-cpu.json

Once quantized, a tied table is stored twice (llm-compressor unties it): the input-embedding copy rounded to
nearest, the lm_head copy by GPTQ. Everything else stays unquantized here; each row quantizes one copy, or both, a
given way, and measures the perplexity with quantflow's own evaluation (the spec's eval text and windows):

- the embedding copy alone: round-to-nearest W4 at group 128 / 64 / 32 (min-max scales, and llm-compressor's
  ``memoryless_mse`` observer, which searches clipped scales), W6 and W8 per output channel;
- the lm_head copy alone: W4 group 128 by round-to-nearest and by llm-compressor's GPTQ solve (its Hessian from the
  unquantized model's lm_head inputs over the calibration set), W4 group 64 and W6 per channel by GPTQ, W8 per
  channel rounded to nearest;
- pairs of the two, with their stored bits per table weight (both copies, scales and zero points included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

# (label, bits, group size or None for per channel, observer, "rtn" or "gptq")
EMBEDDING = {
    "w4g128": (4, 128, "minmax", "rtn"),
    "w4g64": (4, 64, "minmax", "rtn"),
    "w4g32": (4, 32, "minmax", "rtn"),
    "w4g128-mse": (4, 128, "memoryless_mse", "rtn"),
    "w4g32-mse": (4, 32, "memoryless_mse", "rtn"),
    "w6": (6, None, "minmax", "rtn"),
    "w8": (8, None, "minmax", "rtn"),
}
HEAD = {
    "w4g128-rtn": (4, 128, "minmax", "rtn"),
    "w4g128-gptq": (4, 128, "minmax", "gptq"),
    "w4g64-gptq": (4, 64, "minmax", "gptq"),
    "w6-gptq": (6, None, "minmax", "gptq"),
    "w8": (8, None, "minmax", "rtn"),
}
PAIRS = [
    ("w4g128", "w4g128-gptq"),  # what a run stores today
    ("w4g32", "w4g128-gptq"),
    ("w6", "w4g128-gptq"),
    ("w8", "w4g128-gptq"),
    ("w4g128", "w6-gptq"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples/gemma3-270m-mixed.yaml")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="the bf16 row and these rows only (labels as in the output)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantflow.evaluation.evaluate import eval_tokens, score, window_span
    from quantflow.inputs.calibration import load_samples
    from quantflow.inputs.corpus import evaluation_documents
    from quantflow.pipeline import steps
    from quantflow.pipeline.planning import plan
    from quantflow.quantization.sensitivity import hessians
    from quantflow.quantization.targets import input_embedding

    spec = load_spec_reduced(args)
    planned = plan(spec, progress=lambda _: None)
    calibration = steps.calibrate(planned).record
    samples = load_samples(calibration)
    path = planned.model.path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    embedding = model.get_submodule(input_embedding(model))
    head = model.get_output_embeddings()
    table = embedding.weight.detach().clone()
    head.weight = torch.nn.Parameter(table.clone(), requires_grad=False)  # untie: each copy its own tensor
    ids = eval_tokens(evaluation_documents(spec.calibration, spec.evaluation), tokenizer)
    span, bos = window_span(spec.evaluation, model, tokenizer)
    result: dict = {
        "spec": str(args.spec),
        "model": path,
        "table": list(table.shape),
        "calibration": f"{calibration.samples} samples of up to {spec.calibration.seq_len} tokens",
        "evaluation": f"{spec.evaluation.max_windows} windows of {spec.evaluation.window} tokens",
        "rows": [],
    }

    def perplexity() -> float:
        return round(math.exp(score(model, ids, spec.evaluation, span, bos, None, None)[0]), 4)

    def quant_args(bits: int, group: int | None, observer: str) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=False,
            strategy="group" if group else "channel",
            group_size=group,
            observer=observer,
        )

    clock = time.perf_counter()
    hessian = hessians(model, [name for name, m in model.named_modules() if m is head], samples)
    hessian = next(iter(hessian.values()))
    result["hessian_seconds"] = round(time.perf_counter() - clock, 1)

    done: dict[tuple, torch.Tensor] = {}

    def quantized(how: tuple) -> torch.Tensor:
        if how not in done:  # a copy quantized one way is the same in every row
            done[how] = quantize(how)
        return done[how]

    def quantize(how: tuple) -> torch.Tensor:
        bits, group, observer, method = how
        qargs = quant_args(bits, group, observer)
        found = Observer.load_from_registry(observer, base_name="weight", args=qargs)(table).get_qparams()
        if method == "rtn":
            return fake_quantize(table, found["scale"], found["zero_point"], qargs)
        out, _, _ = quantize_weight(
            table.unsqueeze(0).clone(),
            hessian.unsqueeze(0).clone(),
            found["scale"].unsqueeze(0),
            found["zero_point"].unsqueeze(0),
            None,
            qargs,
            blocksize=128,
            percdamp=0.01,
        )
        return out[0]

    def stored_bits(how: tuple | None) -> float:
        if how is None:
            return 16.0
        bits, group, _, _ = how
        per = group or table.shape[1]
        return bits + (16 + bits) / per  # a bf16 scale and a packed zero point per group or row

    def measure(label: str, emb: str | None, hd: str | None) -> None:
        clock = time.perf_counter()
        embedding.weight.data = quantized(EMBEDDING[emb]) if emb else table
        head.weight.data = quantized(HEAD[hd]) if hd else table
        spent = time.perf_counter() - clock
        embedding_bits, head_bits = stored_bits(EMBEDDING.get(emb)), stored_bits(HEAD.get(hd))
        row = {
            "row": label,
            "embedding": emb or "bf16",
            "lm_head": hd or "bf16",
            "bits_per_table_weight": round(embedding_bits + head_bits if emb or hd else 16.0, 4),
            "embedding_rel_error": round(float((embedding.weight - table).norm() / table.norm()), 5),
            "lm_head_rel_error": round(float((head.weight - table).norm() / table.norm()), 5),
            "ppl": perplexity(),
            "quantize_seconds": round(spent, 1),
        }
        if result["rows"]:
            row["increase_pct"] = round(100 * (row["ppl"] / result["rows"][0]["ppl"] - 1), 2)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=1))

    rows = [(f"embedding {emb}", emb, None) for emb in EMBEDDING] + [(f"lm_head {hd}", None, hd) for hd in HEAD]
    rows += [(f"embedding {emb} + lm_head {hd}", emb, hd) for emb, hd in PAIRS]
    measure("bf16", None, None)
    for label, emb, hd in rows:
        if not args.only or label in args.only:
            measure(label, emb, hd)


def load_spec_reduced(args):
    """The spec with the reduced protocol: fewer calibration samples, shorter, fewer evaluation windows."""
    from quantflow.spec import load_spec

    spec = load_spec(args.spec)
    return spec.model_copy(
        update={
            "calibration": spec.calibration.model_copy(update={"num_samples": args.samples, "seq_len": args.seq_len}),
            "evaluation": spec.evaluation.model_copy(update={"max_windows": args.windows}),
        }
    )


if __name__ == "__main__":
    main()
