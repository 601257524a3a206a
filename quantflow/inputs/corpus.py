"""Text sources for calibration and evaluation, and the rule that keeps the two disjoint.

Sources: ``builtin:pydoc`` (CPython's ``pydoc_data.topics``, English, always offline), local
``.txt`` (documents separated by blank lines), ``.jsonl``, ``.parquet``, ``.csv`` files with a
text column, and ``hf:<dataset>[:<config>][:<split>]`` for users who can reach the hub.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from quantflow.errors import QuantflowError
from quantflow.spec import CalibrationSpec, EvaluationSpec

Role = Literal["calibration", "evaluation"]
TABLE_SUFFIXES = {".jsonl", ".parquet", ".csv"}


OFFLINE_SOURCES = "a .txt/.jsonl/.parquet/.csv file, builtin:pydoc, or a local dataset folder as hf:/path/to/folder"


def check_source(field: str, source: str) -> None:
    """A cheap plan-time check of a text source, so a typo or an unreachable hub fails before the model is loaded."""
    if source.startswith("hf:"):
        check_hub(field, source)
        return
    if source == "builtin:pydoc":
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise QuantflowError(
            f"{field} {source} does not exist",
            f"pass {OFFLINE_SOURCES}, or hf:<dataset> on the hub",
        )
    _refuse_binary(path)


def load_texts(source: str, text_column: str = "text") -> list[str]:
    """All documents of a source, in a stable order."""
    if source == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if source.startswith("hf:"):
        return _hub_texts(source[3:], text_column)
    check_source("text source", source)
    path = Path(source).expanduser()
    texts = _file_texts(path, text_column)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise QuantflowError(f"text source {path} holds no text", "pass a file with at least a few paragraphs of text")
    return texts


def _refuse_binary(path: Path) -> None:
    if path.suffix == ".parquet":
        return
    head = path.read_bytes()[:8192]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not merely a multi-byte character cut at the 8 KiB mark
            raise QuantflowError(
                f"{path} is not UTF-8 text (binary data?)", "pass a UTF-8 text, JSONL, CSV or Parquet file"
            ) from None
    if b"\x00" in head:
        raise QuantflowError(
            f"{path} looks binary (contains NUL bytes)", "pass a UTF-8 text, JSONL, CSV or Parquet file"
        )


def _file_texts(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return _column(rows, column, path)
    if suffix == ".csv":
        with path.open(newline="") as handle:
            return _column(list(csv.DictReader(handle)), column, path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise QuantflowError(
                f"{path} has no column '{column}' (columns: {', '.join(table.column_names)})",
                "set text_column to the column holding text",
            )
        return [str(value) for value in table.column(column).to_pylist() if value is not None]
    return [part.strip() for part in re.split(r"\n\s*\n", path.read_text()) if part.strip()]


def _column(rows: list[dict], column: str, path: Path) -> list[str]:
    if rows and column not in rows[0]:
        raise QuantflowError(
            f"{path} has no field '{column}' (fields: {', '.join(rows[0])})",
            "set text_column to the field holding text",
        )
    return [str(row[column]) for row in rows if row.get(column)]


def check_hub(field: str, source: str, timeout: float = 5.0) -> None:
    """Offline, ``datasets`` retries for about a minute and prints its network error at every retry; one connection
    attempt to the hub says the same at once, in one line. A local folder, or the hub's offline mode (which reads
    the local cache), needs no network."""
    from huggingface_hub import constants

    dataset = source[3:].split(":")[0]
    if Path(dataset).expanduser().is_dir() or constants.HF_HUB_OFFLINE:
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as error:
        raise QuantflowError(
            f"{field} {source}: the Hugging Face hub ({endpoint.hostname}) is unreachable ({error.strerror or error})",
            f"use an offline source: {OFFLINE_SOURCES}; or connect this machine to the hub",
        ) from None


def _hub_texts(name: str, column: str) -> list[str]:
    dataset, config, split = (name.split(":") + [None, None])[:3]
    check_hub("text source", f"hf:{name}")
    try:
        from datasets import load_dataset

        data = load_dataset(dataset, config or None, split=split or "train")
    except Exception as error:  # datasets raises many unrelated types for "not reachable"
        raise QuantflowError(
            f"could not load hub dataset '{name}' ({type(error).__name__}: {error})",
            f"check the name, or use an offline source: {OFFLINE_SOURCES}",
        ) from None
    if column not in data.column_names:
        raise QuantflowError(
            f"dataset '{name}' has no column '{column}'", f"set text_column to one of: {', '.join(data.column_names)}"
        )
    return [text for text in data[column] if text]


def prepare(texts: list[str], min_chars: int, dedup: bool) -> list[str]:
    """Drop short texts and (optionally) exact duplicates, keeping the first occurrence."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text) < min_chars or (dedup and digest in seen):
            continue
        seen.add(digest)
        kept.append(text)
    return kept


def split_role(texts: list[str], role: Role) -> list[str]:
    """Deterministic disjoint halves of one source: even positions calibrate, odd ones evaluate."""
    return texts[0::2] if role == "calibration" else texts[1::2]


def disjoint(evaluation: list[str], calibration: list[str]) -> list[str]:
    """Evaluation texts minus any text that also appears in calibration (different sources may overlap)."""
    used = {hashlib.sha256(text.encode()).hexdigest() for text in calibration}
    return [text for text in evaluation if hashlib.sha256(text.encode()).hexdigest() not in used]


def calibration_documents(calibration: CalibrationSpec, evaluation: EvaluationSpec) -> list[str]:
    """Texts calibration may use: the even half when both steps read the same source."""
    texts = prepare(load_texts(calibration.source, calibration.text_column), calibration.min_chars, calibration.dedup)
    return split_role(texts, "calibration") if calibration.source == evaluation.corpus else texts


def evaluation_documents(calibration: CalibrationSpec, evaluation: EvaluationSpec) -> list[str]:
    """Held-out texts: the odd half of a shared source, or another source minus anything calibration saw."""
    if calibration.source == evaluation.corpus:
        texts = prepare(
            load_texts(calibration.source, calibration.text_column), calibration.min_chars, calibration.dedup
        )
        return split_role(texts, "evaluation")
    texts = prepare(load_texts(evaluation.corpus, evaluation.text_column), 0, True)
    return disjoint(texts, calibration_documents(calibration, evaluation))
