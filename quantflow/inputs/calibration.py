"""Calibration-set build: texts -> tokenized samples on disk, with stats and a content hash.

Long documents are cut into consecutive ``seq_len``-token chunks (as llm-compressor's
concatenating collator does), so a small corpus still yields many full-length samples.
The hash covers the exact token ids, so any change of text, tokenizer or option changes
every downstream cache key.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from quantflow.errors import QuantflowError
from quantflow.infra import progress
from quantflow.inputs.corpus import calibration_documents
from quantflow.spec import DEFAULT_CALIBRATION_SAMPLES, CalibrationSpec, EvaluationSpec

SAMPLES_FILE = "samples.safetensors"
# bump when the same texts and settings give other samples: the calibration step's cache key carries it (2: a plain
# text's samples start with the BOS token its tokenizer adds)
SAMPLES_VERSION = 2
MIN_CHUNK_FRACTION = 4  # a trailing chunk shorter than seq_len / 4 adds little signal; drop it


class CalibrationRecord(BaseModel):
    """What the calibration step produced; small enough to pass between tasks."""

    path: str
    hash: str
    source: str
    samples: int
    tokens: int
    min_len: int
    max_len: int
    mean_len: float
    histogram: dict[str, int]
    note: str | None = None


def _chunks(ids: list[int], seq_len: int) -> list[list[int]]:
    pieces = [ids[start : start + seq_len] for start in range(0, len(ids), seq_len)]
    return [piece for piece in pieces if len(piece) >= max(2, seq_len // MIN_CHUNK_FRACTION)]


def text_start(tokenizer) -> list[int]:
    """The BOS token when the tokenizer starts every text with it (Gemma's; SmolLM2's tokenizer adds none): calibration
    samples start as the model's inputs do in training and in serving, not at a first token it never sees first."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize_samples(texts: list[str], tokenizer, spec: CalibrationSpec) -> list[list[int]]:
    """Token id lists, at most ``seq_len`` long, shuffled with ``seed`` and cut to ``num_samples``; a plain text's
    samples start with ``text_start`` (a chat template writes its own)."""
    start = text_start(tokenizer)
    samples: list[list[int]] = []
    for done, text in enumerate(texts, start=1):
        progress.advance(done, len(texts), "texts")
        if spec.chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise QuantflowError(
                    "calibration.chat_template is on but the tokenizer has no chat template",
                    "set calibration.chat_template: false",
                )
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
            samples.append(tokenizer(text, add_special_tokens=False)["input_ids"][: spec.seq_len])
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            samples.extend(start + chunk for chunk in _chunks(ids, spec.seq_len - len(start)))
    random.Random(spec.seed).shuffle(samples)
    usable = (
        f"calibration source {spec.source} gives only {len(samples)} usable samples of <= {spec.seq_len} tokens "
        f"(after min_chars={spec.min_chars}, dedup and the calibration/evaluation split)"
    )
    if not samples or (spec.num_samples is not None and len(samples) < spec.num_samples):
        raise QuantflowError(
            f"{usable}; {spec.num_samples or DEFAULT_CALIBRATION_SAMPLES} were asked",
            f"lower calibration.num_samples to {len(samples)} or less, lower seq_len, or add more text"
            if samples
            else "lower min_chars or seq_len, or pass a calibration source with more text",
        )
    return samples[: spec.num_samples or DEFAULT_CALIBRATION_SAMPLES]


def shortfall(spec: CalibrationSpec, samples: int) -> str | None:
    """The warning for a default sample count the source could not fill (None when nothing is short)."""
    if spec.num_samples is None and samples < DEFAULT_CALIBRATION_SAMPLES:
        return (
            f"calibration uses {samples} samples, fewer than the default {DEFAULT_CALIBRATION_SAMPLES}: that is all "
            f"{spec.source} holds at seq_len {spec.seq_len}"
        )
    return None


def _histogram(lengths: list[int], seq_len: int) -> dict[str, int]:
    edges = [seq_len * k // 4 for k in range(5)]
    return {f"{lo + 1}-{hi}": sum(lo < n <= hi for n in lengths) for lo, hi in zip(edges, edges[1:])}


def samples_hash(samples: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for ids in samples:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:20]


def build_calibration(
    spec: CalibrationSpec, evaluation: EvaluationSpec, tokenizer_path: str, out: Path, final: Path
) -> CalibrationRecord:
    """Tokenize the calibration texts into ``out`` and describe them; ``final`` is where ``out`` will live."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    samples = tokenize_samples(calibration_documents(spec, evaluation), tokenizer, spec)
    save_file(
        {f"sample_{i:06d}": torch.tensor(ids, dtype=torch.int64) for i, ids in enumerate(samples)}, out / SAMPLES_FILE
    )
    lengths = [len(ids) for ids in samples]
    record = CalibrationRecord(
        path=str(final),
        hash=samples_hash(samples),
        source=spec.source,
        samples=len(samples),
        tokens=sum(lengths),
        min_len=min(lengths),
        max_len=max(lengths),
        mean_len=round(sum(lengths) / len(lengths), 1),
        histogram=_histogram(lengths, spec.seq_len),
        note=shortfall(spec, len(samples)),
    )
    (out / "stats.json").write_text(json.dumps(record.model_dump(exclude={"path"}), indent=2))
    return record


def load_samples(record: CalibrationRecord) -> list[torch.Tensor]:
    """The saved samples as 1-D int64 tensors, in their saved order."""
    tensors = load_file(str(Path(record.path) / SAMPLES_FILE))
    return [tensors[key] for key in sorted(tensors)]
