"""The report's KV-cache figures: each row's cache, its long-context perplexity against the baseline's and against
the same weights with a bf16 cache, and the tokens that fit on the card beside the weights."""

from __future__ import annotations

from pydantic import BaseModel

from quantflow.evaluation.kv_cache import Capacity, KVCacheRecord, capacity


class KVCacheRow(BaseModel):
    """A row's KV cache as reported (``rows[].kv_cache`` in report.json)."""

    precision: str
    bytes_per_token: int | None
    long_window: int | None = None
    long_perplexity: float | None = None
    long_ppl_delta_pct: float | None = None  # against the baseline (bf16 weights, bf16 cache)
    paired_with: str | None = None  # the row with the same weights and a bf16 cache
    kv_ppl_delta_pct: float | None = None  # the cache's own cost: against ``paired_with``
    capacity: Capacity | None  # None when the config does not give the bytes per token


def _delta(value: float | None, reference: float | None) -> float | None:
    return round(100 * (value / reference - 1), 3) if value and reference else None


def kv_rows(names: list[str], records: list[KVCacheRecord | None], weights: list[int], card_memory_gb: float) -> list:
    """Each row's KV-cache figures (None for a row evaluated without them); row 0 is the baseline. A twin
    ``<name>-kv-<precision>`` is paired with ``<name>`` (the baseline's twin with the baseline)."""
    long = {name: record.long_perplexity for name, record in zip(names, records, strict=True) if record}
    reference = long.get(names[0])
    result = []
    for name, record, size in zip(names, records, weights, strict=True):
        if record is None:
            result.append(None)
            continue
        suffix = f"-kv-{record.precision}"
        paired = name.removesuffix(suffix) if record.precision != "bf16" and name.endswith(suffix) else None
        result.append(
            KVCacheRow(
                precision=record.precision,
                bytes_per_token=record.bytes_per_token,
                long_window=record.long_window,
                long_perplexity=record.long_perplexity,
                long_ppl_delta_pct=_delta(record.long_perplexity, reference),
                paired_with=paired if paired in long else None,
                kv_ppl_delta_pct=_delta(record.long_perplexity, long.get(paired)),
                capacity=capacity(size, record.bytes_per_token, card_memory_gb, record.long_window)
                if record.bytes_per_token
                else None,
            )
        )
    return result


def _cell(value: float | None, form: str) -> str:
    return "–" if value is None else format(value, form)


def kv_section(names: list[str], rows: list[KVCacheRow | None]) -> list[str]:
    """The report's KV-cache table, when any row measured a long context."""
    measured = [(name, row) for name, row in zip(names, rows, strict=True) if row and row.long_window]
    if not measured:
        return []
    window = measured[0][1].long_window
    card = next((row.capacity.card_memory_gb for _, row in measured if row.capacity), 0)
    head = [
        "variant",
        "KV cache",
        "KV bytes/token",
        f"perplexity at {window} tok",
        "Δ vs baseline %",
        "Δ vs bf16 KV %",
        f"max KV tokens on {card:g} GiB",
        f"max batch at {window} tok",
    ]
    note = (
        f"Perplexity with windows of {window} tokens; 'Δ vs bf16 KV' compares with the same weights and a bf16 cache. "
        f"Capacity: a {card:g} GiB card holding the weights (artifact size) and the KV cache only, no activations."
    )
    lines = ["", "## KV cache", "", note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in measured:
        cells = [
            name,
            row.precision,
            _cell(row.bytes_per_token, ","),
            _cell(row.long_perplexity, ".3f"),
            _cell(row.long_ppl_delta_pct, "+.2f"),
            _cell(row.kv_ppl_delta_pct, "+.2f"),
            _cell(row.capacity.max_kv_tokens if row.capacity else None, ","),
            _cell(row.capacity.max_batch if row.capacity else None, ","),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
