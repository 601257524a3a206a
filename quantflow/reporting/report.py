"""The comparison report: report.json (versioned schema), report.md, PNG plots, model cards.

Best variant rule: among variants within the user's constraints (perplexity increase over
the baseline, optional size ratio), the smallest artifact wins, ties broken by perplexity.
Two Pareto fronts: size vs perplexity (no other row is as small and as good, and better in one)
and speed vs perplexity (batch-1 decode, or the smallest batch timed).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantflow.evaluation.evaluate import EvalRecord
from quantflow.infra.atomic import atomic_files
from quantflow.infra.environment import environment
from quantflow.infra.home import quantflow_home
from quantflow.infra.steps import StepRun
from quantflow.inputs.calibration import CalibrationRecord
from quantflow.inputs.sources import ModelRef
from quantflow.quantization.kv_cache import KV_LABELS, RUNTIME_KV
from quantflow.quantization.mixed import OPTIONS, finer_group, option_counts
from quantflow.quantization.moe import RoutingRecord
from quantflow.quantization.quantize import QuantizeRecord, Smoothing
from quantflow.quantization.sensitivity import SensitivityRecord
from quantflow.reporting.bits import artifact_bits, bnb_bits
from quantflow.reporting.kv_cache import KVCacheRow, kv_rows, kv_section
from quantflow.spec import FINER, BnbVariant, ConstraintsSpec, RunSpec
from quantflow.sweep import Dropped, expand

SCHEMA_VERSION = "1.9"
UNITS = {
    "perplexity": "exp(mean NLL per token), lower is better",
    "ppl_delta_pct": "% change vs baseline",
    "kl_mean": "nats per token, KL(baseline || variant)",
    "size_mb": "MiB (2^20 bytes)",
    "decode_tokens_per_s": "generated tokens per second, all sequences of the batch",
    "prefill_tokens_per_s": "prompt tokens per second",
    "decode_ms_per_token": "milliseconds per decode step",
    "peak_memory_mb": "MiB; CUDA max allocated on GPU, process peak RSS on CPU",
    "quantize_seconds": "wall seconds of the quantization step",
    "compile_seconds": "seconds compiling, autotuning and capturing the decode step (summed over batch sizes)",
    "effective_bits": "stored bits per weight over the quantized Linears, scales and zero points included",
    "kv_cache.bytes_per_token": "bytes of K and V over all layers per cached token",
    "kv_cache.capacity.card_memory_gb": "GiB (2^30 bytes)",
}


PLOTS = {
    "quality_vs_size.png": "Quality vs size",
    "quality_vs_speed.png": "Quality vs speed",
    "throughput_vs_memory.png": "Throughput vs memory",
}


class CalibrationUse(BaseModel):
    """The calibration data a variant was built on: the run's set, or its own (a sweep's ``calibrations`` axis)."""

    source: str
    chat_template: bool
    label: str  # what variant names carry: 'pydoc', a file's stem, '-chat' for chat-formatted text
    own: bool  # True: the variant's own source; False: the run's calibration set (report.calibration)
    samples: int | None = None  # own sets only: the run's set is described in report.calibration
    tokens: int | None = None


class CalibrationCell(BaseModel):
    """One variant's quality under one calibration source."""

    row: str
    perplexity: float
    ppl_delta_pct: float
    kl_mean: float | None


class CalibrationEffect(BaseModel):
    """One variant's settings calibrated on several sources: its quality per source label, side by side."""

    variant: str  # the name without the source label
    method: str
    by_source: dict[str, CalibrationCell]


class VariantResult(BaseModel):
    """One variant as measured: its quantization (none for load-time variants), its evaluation and the steps run."""

    name: str
    method: str
    quantize: QuantizeRecord | None
    evaluation: EvalRecord
    artifact: str | None
    steps: list[StepRun]
    sensitivity: SensitivityRecord | None = None  # mixed variants: the table their allocation read
    calibration: CalibrationUse | None = None  # None: the variant reads no calibration data

    @property
    def cached(self) -> bool:
        return all(step.cached for step in self.steps)


class FailedVariant(BaseModel):
    """A variant that did not finish: the step that failed and the error, named for the method and the model type.

    It is a row of the report, not the end of the run: the variants that finished are reported beside it."""

    name: str
    method: str
    stage: str
    error: str


class StoredArtifact(BaseModel):
    """Where a delivered variant went in the store, and its round-trip check when one ran."""

    name: str
    uri: str
    bytes_sent: int
    already_complete: bool
    roundtrip: dict | None = None


class Row(BaseModel):
    name: str
    method: str
    perplexity: float
    ppl_delta_pct: float
    kl_mean: float | None
    size_mb: float
    size_kind: str
    size_ratio: float
    peak_memory_mb: float
    memory_kind: str
    speed: list[dict]
    prefill: dict | None = None  # batch-1 prefill of a long prompt: prompt_len, tokens_per_s, ms, repeats
    quantize_seconds: float | None
    quantize_peak_memory_mb: float | None
    quantized_layers: int | None
    skipped_layers: list[str]
    group_size: int | None
    group_size_note: str | None
    runtime: str
    artifact: str | None
    artifact_uri: str | None = None
    roundtrip: dict | None = None
    placement: dict[str, float] = {}
    lm_eval: dict[str, dict[str, float]] = {}
    visible_devices: str | None = None
    compile_seconds: float = 0.0
    evaluate_phases: dict[str, float] = {}
    effective_bits: float | None = None
    scheme: str = ""
    smoothing: Smoothing | None = None
    precision: dict[str, str] = {}
    allocated_bits: float | None = None
    sensitivity: SensitivityRecord | None = None
    dominated_by: str | None = None  # mixed rows: a uniform row with fewer bits per weight and lower perplexity
    routing: RoutingRecord | None = None
    kv_cache: KVCacheRow | None = None
    calibration: CalibrationUse | None = None


class Report(BaseModel):
    schema_version: str = SCHEMA_VERSION
    created: str
    model: dict
    calibration: dict
    protocol: dict
    constraints: ConstraintsSpec
    units: dict[str, str]
    rows: list[Row]
    best: str | None
    best_reason: str
    pareto: list[str]
    pareto_speed: list[str] = []
    dropped: list[Dropped] = []
    failed: list[FailedVariant] = []
    generations: dict[str, list[dict]]
    environment: dict
    spec: dict
    steps: list[StepRun] = []
    calibration_effect: list[CalibrationEffect] = []


def unquantized_scheme(evaluation: EvalRecord) -> str:
    """The scheme of a row with no quantize step: the baseline's twin on a runtime KV cache (RUNTIME_KV) says so."""
    precision = evaluation.kv_cache.precision if evaluation.kv_cache else "bf16"
    return f"weights unquantized, {KV_LABELS[precision]}" if precision in RUNTIME_KV else ""


def _row(
    name: str,
    method: str,
    evaluation: EvalRecord,
    baseline: EvalRecord,
    quantize: QuantizeRecord | None = None,
    artifact: str | None = None,
    stored: StoredArtifact | None = None,
    sensitivity: SensitivityRecord | None = None,
    calibration: CalibrationUse | None = None,
) -> Row:
    return Row(
        name=name,
        method=method,
        perplexity=evaluation.perplexity,
        ppl_delta_pct=round(100 * (evaluation.perplexity / baseline.perplexity - 1), 3),
        kl_mean=evaluation.kl_mean,
        size_mb=round(evaluation.size_bytes / 2**20, 2),
        size_kind=evaluation.size_kind,
        size_ratio=round(evaluation.size_bytes / baseline.size_bytes, 4),
        peak_memory_mb=evaluation.peak_memory_mb,
        memory_kind=evaluation.memory_kind,
        speed=[s.model_dump() for s in evaluation.speed],
        prefill=evaluation.prefill.model_dump() if evaluation.prefill else None,
        quantize_seconds=quantize.seconds if quantize else None,
        quantize_peak_memory_mb=quantize.peak_memory_mb if quantize else None,
        quantized_layers=len(quantize.quantized_layers) if quantize else None,
        skipped_layers=quantize.skipped_layers if quantize else [],
        group_size=quantize.group_size if quantize else None,
        group_size_note=quantize.group_size_note if quantize else None,
        scheme=quantize.scheme if quantize else unquantized_scheme(evaluation),
        smoothing=quantize.smoothing if quantize else None,
        precision=quantize.precision if quantize else {},
        allocated_bits=quantize.allocated_bits if quantize else None,
        sensitivity=sensitivity,
        calibration=calibration,
        routing=quantize.routing if quantize else None,
        runtime=evaluation.runtime,
        artifact=artifact,
        placement=evaluation.placement,
        lm_eval=evaluation.lm_eval,
        compile_seconds=round(sum(s.compile_seconds for s in evaluation.speed), 2),
        visible_devices=evaluation.visible_devices,
        evaluate_phases=evaluation.phase_seconds,
        artifact_uri=stored.uri if stored else None,
        roundtrip=stored.roundtrip if stored else None,
    )


def row_bits(row: Row, load_time: dict[str, BnbVariant], model: ModelRef) -> float | None:
    """Effective bits per weight of a row: from its artifact's files, or bitsandbytes' layout for load-time rows."""
    if row.artifact:
        return artifact_bits(Path(row.artifact))
    variant = load_time.get(row.name)
    return bnb_bits(variant.method, variant.double_quant, Path(model.path)) if variant else None


def dominating(row: Row, rows: list[Row]) -> str | None:
    """For a mixed row, the uniform row that beats it with fewer bits per weight: the precision it bought was wasted,
    and the report says so rather than offer it."""
    if not row.precision or row.effective_bits is None:
        return None
    better = [
        o
        for o in rows
        if o.name != "baseline"
        and not o.precision
        and o.effective_bits is not None
        and o.effective_bits < row.effective_bits
        and o.perplexity < row.perplexity
    ]
    return min(better, key=lambda o: o.perplexity).name if better else None


def pick_best(rows: list[Row], constraints: ConstraintsSpec) -> tuple[str | None, str]:
    """The smallest row within the constraints; a mixed row dominated by a uniform one is never picked."""
    candidates = [
        r
        for r in rows
        if r.name != "baseline"
        and r.dominated_by is None
        and r.ppl_delta_pct <= constraints.max_ppl_increase_pct
        and (constraints.max_size_ratio is None or r.size_ratio <= constraints.max_size_ratio)
    ]
    rule = f"perplexity increase <= {constraints.max_ppl_increase_pct}%" + (
        f" and size <= {constraints.max_size_ratio}x baseline" if constraints.max_size_ratio else ""
    )
    if not candidates:
        return None, f"no variant meets {rule}"
    best = min(candidates, key=lambda r: (r.size_mb, r.perplexity))
    return best.name, f"smallest variant with {rule}"


def front(rows: list[Row], cost) -> list[str]:
    """Rows no other row dominates in (cost, perplexity): at least as good in both and better in one.

    A row with a NaN or infinite cost or perplexity (a diverged variant) is no trade-off: comparisons with NaN are
    all false, so it would otherwise sit on the front, never dominated. Such rows are left out before comparing.
    Exact duplicates dominate neither each other, so both stay.
    """
    finite = [r for r in rows if math.isfinite(cost(r)) and math.isfinite(r.perplexity)]

    def dominated(r: Row) -> bool:
        return any(
            cost(o) <= cost(r) and o.perplexity <= r.perplexity and (cost(o) < cost(r) or o.perplexity < r.perplexity)
            for o in finite
        )

    return [r.name for r in finite if not dominated(r)]


def pareto(rows: list[Row]) -> list[str]:
    """The size vs perplexity front."""
    return front(rows, lambda r: r.size_mb)


def first_decode(row: Row) -> float | None:
    """Decode tokens/s at the smallest batch timed (batch 1 by default), or None when the row was not timed."""
    return min(row.speed, key=lambda s: s["batch"])["decode_tokens_per_s"] if row.speed else None


def pareto_speed(rows: list[Row]) -> list[str]:
    """The speed vs perplexity front over the timed rows (faster is better, so the cost is minus tokens/s)."""
    return front([r for r in rows if r.speed], lambda r: -first_decode(r))


def build_report(
    spec: RunSpec,
    model: ModelRef,
    calibration: CalibrationRecord,
    baseline: EvalRecord,
    variants: list[VariantResult],
    steps: list[StepRun],
    stored: list[StoredArtifact] = (),
    dropped: list[Dropped] = (),
    failed: list[FailedVariant] = (),
) -> Report:
    """The report of a run from its records; ``stored`` (after upload) adds each row's URI and round-trip check."""
    where = {s.name: s for s in stored}
    rows = [_row("baseline", f"none ({spec.model.dtype})", baseline, baseline, artifact=model.path)]
    rows += [
        _row(
            v.name,
            v.method,
            v.evaluation,
            baseline,
            v.quantize,
            v.artifact,
            where.get(v.name),
            v.sensitivity,
            v.calibration,
        )
        for v in variants
    ]
    specs = {v.name: v for v in [*spec.variants, *expand(spec)[0]]}
    load_time = {name: v for name, v in specs.items() if isinstance(v, BnbVariant)}
    rows = [row.model_copy(update={"effective_bits": row_bits(row, load_time, model)}) for row in rows]
    rows = [row.model_copy(update={"dominated_by": dominating(row, rows)}) for row in rows]
    evaluations = [baseline, *(v.evaluation for v in variants)]
    caches = kv_rows(
        [r.name for r in rows],
        [e.kv_cache for e in evaluations],
        [e.size_bytes for e in evaluations],
        spec.evaluation.card_memory_gb,
    )
    rows = [row.model_copy(update={"kv_cache": cache}) for row, cache in zip(rows, caches, strict=True)]
    best, reason = pick_best(rows, spec.constraints)
    return Report(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=model.model_dump(),
        calibration=calibration.model_dump(exclude={"path"}),
        protocol={**baseline.protocol, "device": baseline.device, "compute_dtype": baseline.compute_dtype},
        constraints=spec.constraints,
        units=UNITS,
        rows=rows,
        best=best,
        best_reason=reason,
        pareto=pareto(rows),
        pareto_speed=pareto_speed(rows),
        dropped=list(dropped),
        failed=list(failed),
        generations={"baseline": baseline.generations, **{v.name: v.evaluation.generations for v in variants}},
        environment=environment(),
        spec=spec.model_dump(mode="json"),
        steps=steps + [step for v in variants for step in v.steps],
        calibration_effect=calibration_effect(rows, specs),
    )


def calibration_effect(rows: list[Row], specs: dict[str, Any]) -> list[CalibrationEffect]:
    """Rows that differ only in their calibration data, grouped, each group's quality per source: the comparison
    users ask for ("which data should I calibrate on?"). Empty when the run used one source."""
    calibrated = [r for r in rows if r.calibration is not None and r.name in specs]
    if len({r.calibration.label for r in calibrated}) < 2:
        return []
    groups: dict[str, list[Row]] = {}
    for r in calibrated:
        settings = json.dumps(specs[r.name].model_dump(mode="json", exclude={"name", "calibration"}), sort_keys=True)
        groups.setdefault(settings, []).append(r)
    return [
        CalibrationEffect(
            variant=group[0].name.removesuffix(f"-cal-{group[0].calibration.label}"),
            method=group[0].method,
            by_source={
                r.calibration.label: CalibrationCell(
                    row=r.name, perplexity=r.perplexity, ppl_delta_pct=r.ppl_delta_pct, kl_mean=r.kl_mean
                )
                for r in group
            },
        )
        for group in groups.values()
        if len(group) > 1
    ]


def _source_line(label: str, use: CalibrationUse) -> str:
    chat = " (chat template)" if use.chat_template else ""
    size = f", {use.samples} samples, {use.tokens} tokens" if use.samples else " (the run's calibration set)"
    return f"- **{label}**: {use.source}{chat}{size}"


def _calibration_effect(report: Report) -> list[str]:
    """The effect table: one line per variant, perplexity / Δppl / KL under each calibration source."""
    if not report.calibration_effect:
        return []
    labels = list(dict.fromkeys(label for e in report.calibration_effect for label in e.by_source))
    sources = {r.calibration.label: r.calibration for r in report.rows if r.calibration is not None}
    lines = ["", "## Calibration data", "", "Perplexity / Δppl % / KL (nats/tok) of each variant under each source:"]
    lines += [""] + [_source_line(label, sources[label]) for label in labels]
    lines += ["", "| variant | method | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for effect in report.calibration_effect:
        cells = [
            f"{c.perplexity:.3f} / {c.ppl_delta_pct:+.2f} / {'–' if c.kl_mean is None else f'{c.kl_mean:.4f}'}"
            if (c := effect.by_source.get(label))
            else "–"
            for label in labels
        ]
        lines.append(f"| {effect.variant} | {effect.method} | " + " | ".join(cells) + " |")
    return lines


def _speed(row: Row, batch: int, field: str) -> str:
    match = [s for s in row.speed if s["batch"] == batch]
    return f"{match[0][field]:.1f}" if match else "–"


def speed_columns(report: Report) -> tuple[list[int], list[int]]:
    """The batch sizes timed and the long-prompt lengths prefilled over all rows: one column each, in every table."""
    batches = sorted({s["batch"] for r in report.rows for s in r.speed})
    return batches, sorted({r.prefill["prompt_len"] for r in report.rows if r.prefill})


def _long_prefill(row: Row, prompt_len: int) -> str:
    return f"{row.prefill['tokens_per_s']:.1f}" if row.prefill and row.prefill["prompt_len"] == prompt_len else "–"


def markdown(report: Report) -> str:
    batches, long = speed_columns(report)
    head = [
        "variant",
        "method",
        "scheme",
        "perplexity",
        "Δppl %",
        "KL (nats/tok)",
        "bits/weight",
        "size MiB",
        "size ×",
        "peak mem MiB",
    ]
    head += (
        [f"decode tok/s b{b}" for b in batches]
        + [f"prefill tok/s b{b}" for b in batches]
        + [f"prefill tok/s {n} tok" for n in long]
        + ["quantize s", "compile s"]
    )
    lines = [
        f"# quantflow report: {report.model['source']}",
        "",
        f"Best variant: **{report.best or 'none'}** ({report.best_reason}). Pareto front, size vs perplexity: "
        f"{', '.join(report.pareto)}; speed vs perplexity: {', '.join(report.pareto_speed) or 'not timed'}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report.rows:
        cells = [
            r.name,
            r.method,
            r.scheme or "–",
            f"{r.perplexity:.3f}",
            f"{r.ppl_delta_pct:+.2f}",
            "–" if r.kl_mean is None else f"{r.kl_mean:.4f}",
            "–" if r.effective_bits is None else f"{r.effective_bits:.3f}",
            f"{r.size_mb:.1f}",
            f"{r.size_ratio:.3f}",
            f"{r.peak_memory_mb:.0f}",
        ]
        cells += [_speed(r, b, "decode_tokens_per_s") for b in batches] + [
            _speed(r, b, "prefill_tokens_per_s") for b in batches
        ]
        cells += [_long_prefill(r, n) for n in long]
        cells.append("–" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f}")
        cells.append(f"{r.compile_seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    for f in report.failed:
        lines.append("| " + " | ".join([f.name, f.method, f"failed at {f.stage}"] + ["–"] * (len(head) - 3)) + " |")
    p = report.protocol
    env = report.environment
    lines += [
        "",
        "## Protocol",
        "",
        f"Perplexity: {p['scored_tokens']} scored tokens of a held-out split, windows of {p['window_tokens']} tokens "
        f"(BOS {'on' if p['bos'] else 'off'}), stride {p['stride']}, on {p['device']} in {p['compute_dtype']}. KL: "
        "mean per-token KL(baseline ‖ variant) on the first scored tokens. Sizes: on-disk safetensors, or "
        "in-memory weights for load-time bitsandbytes variants. Memory: " + UNITS["peak_memory_mb"] + ".",
        f"Calibration: {report.calibration['samples']} samples, {report.calibration['tokens']} tokens from "
        f"{report.calibration['source']} (hash {report.calibration['hash']})."
        + (f" Warning: {report.calibration['note']}." if report.calibration.get("note") else ""),
        "",
        "## Runtimes and layers",
        "",
    ]
    for r in report.rows:
        layers = (
            ""
            if r.quantized_layers is None
            else f"; {r.quantized_layers} layers quantized, skipped: {', '.join(r.skipped_layers) or 'none'}"
        )
        note = f"; {r.group_size_note}" if r.group_size_note else ""
        harness = f"; timed with {r.speed[0]['harness']}" if r.speed and r.speed[0].get("harness") else ""
        card = f"; CUDA_VISIBLE_DEVICES={r.visible_devices}" if r.visible_devices is not None else ""
        lines.append(f"- **{r.name}**: {r.runtime}{harness}{layers}{note}{card}")
    lines += _smoothing(report.rows) + _mixed(report.rows) + _dropped(report.dropped) + _failed(report.failed)
    lines += _routing(report.rows) + _calibration_effect(report)
    lines += kv_section([r.name for r in report.rows], [r.kv_cache for r in report.rows])
    lines += _lm_eval_table(report.rows)
    lines += ["", "## Greedy samples", ""]
    for name, samples in report.generations.items():
        for sample in samples:
            lines += [f"**{name}** · {sample['prompt']}", "", *fenced(sample["output"].strip()), ""]
    lines += [
        "",
        "## Environment",
        "",
        f"torch {env['packages']['torch']}, transformers {env['packages']['transformers']}, llmcompressor "
        f"{env['packages']['llmcompressor']}, compressed-tensors {env['packages']['compressed-tensors']}, "
        f"bitsandbytes {env['packages']['bitsandbytes']}, CUDA {env['cuda']}, GPU {env['gpu']}, {env['cpu_count']} "
        f"CPUs ({env.get('cpu', 'model not recorded')}, {env.get('cpu_kernels', 'kernels not recorded')}, torch threads {env.get('torch_threads', 'not recorded')}), "
        f"Python {env['python']}. Report schema {report.schema_version}.",
        "",
    ]
    return "\n".join(lines)


def role(name: str) -> str:
    """A layer's role in its block: 'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def by_role(names: list[str]) -> str:
    """Layer names counted by role ('self_attn.q_proj x 30'): a 7B has hundreds of them."""
    counts: dict[str, int] = {}
    for name in names:
        counts[role(name)] = counts.get(role(name), 0) + 1
    return ", ".join(f"{name} x {count}" for name, count in counts.items()) or "none"


def _smoothing(rows: list[Row]) -> list[str]:
    """For AWQ-family rows, what was smoothed and what was not, so a weak AWQ result can be explained."""
    smoothed = [r for r in rows if r.smoothing is not None]
    if not smoothed:
        return []
    lines = ["", "## AWQ smoothing", ""]
    for r in smoothed:
        pairs: dict[str, int] = {}
        for mapping in r.smoothing.mappings:
            key = f"{role(mapping['smooth'])} -> {', '.join(role(name) for name in mapping['balance'])}"
            pairs[key] = pairs.get(key, 0) + 1
        applied = "; ".join(f"{pair} ({count} blocks)" for pair, count in pairs.items()) or "none"
        lines.append(
            f"- **{r.name}**: {len(r.smoothing.mappings)} mappings applied: {applied}. Quantized but not smoothed: "
            f"{by_role(r.smoothing.unsmoothed)}."
        )
    return lines


def _mixed(rows: list[Row]) -> list[str]:
    """Per mixed row: what the allocation chose, where its sensitivity table is, and the precision map."""
    mixed = [r for r in rows if r.precision]
    if not mixed:
        return []
    lines = ["", "## Mixed precision", ""]
    for r in mixed:
        counts = option_counts(r.precision)
        kept = [n for n, o in r.precision.items() if o != "w4"]
        six = f"{counts['w6']} W6, " if counts["w6"] else ""  # the embedding table's middle step
        finer = "".join(f"{counts[o]} W4 group {finer_group(o)}, " for o in FINER if counts[o])
        lines += [
            f"**{r.name}**: {r.allocated_bits} bits per weight allocated ({r.effective_bits} stored), "
            f"{counts['w4']} Linears W4, {finer}{six}{counts['w8']} W8, "
            f"{counts['bf16']} bf16, from its {r.sensitivity.measure} "
            f"sensitivity on {r.sensitivity.tokens} tokens (`{sensitivity_file(r.name)}`). Above W4: "
            f"{by_role(kept) or 'none'}."
            + (
                f" **Dominated by {r.dominated_by}**: fewer bits per weight and a lower perplexity; never the Best pick."
                if r.dominated_by
                else ""
            ),
            "",
            f"![precision per layer: {r.name}]({precision_file(r.name)})",
            "",
        ]
    return lines


def sensitivity_file(name: str) -> str:
    return f"sensitivity-{name}.json"


def precision_file(name: str) -> str:
    return f"precision-{name}.png"


def _dropped(dropped: list[Dropped]) -> list[str]:
    if not dropped:
        return []
    return ["", "## Sweep combinations left out", ""] + [f"- **{d.name}**: {d.reason}" for d in dropped]


def _routing(rows: list[Row]) -> list[str]:
    """Per variant and MoE layer, the calibration tokens top-k routing sent each expert; experts under the floor
    are named (every expert was still calibrated on every token)."""
    routed = [r for r in rows if r.routing]
    if not routed:
        return []
    lines = [
        "",
        "## Expert routing of the calibration tokens",
        "",
        "Every expert is calibrated on every calibration token (llm-compressor's `moe_calibrate_all_experts`); the "
        "counts are the tokens top-k routing sent each expert during calibration, which is what it will see in use. "
        "Experts under the floor (a tenth of an even share) are flagged.",
    ]
    for row in routed:
        record = row.routing
        lines += ["", f"**{row.name}**: {record.tokens} tokens, top-{record.top_k}, floor {record.floor} tokens", ""]
        for layer in dict.fromkeys(e.layer for e in record.experts):
            experts = [e for e in record.experts if e.layer == layer]
            flagged = [str(e.expert) for e in experts if e.under_floor]
            counts = ", ".join(str(e.tokens) for e in experts)
            lines.append(f"- {layer}: {counts}" + (f" — under the floor: {', '.join(flagged)}" if flagged else ""))
    return lines


def _failed(failed: list[FailedVariant]) -> list[str]:
    if not failed:
        return []
    return ["", "## Variants that failed", ""] + [f"- **{f.name}** ({f.stage}): {f.error}" for f in failed]


def fenced(text: str) -> list[str]:
    """``text`` as a markdown code block that shows it verbatim, line breaks and all, whatever backticks it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text or "(empty)", fence]


def headline_metric(metrics: dict[str, float]) -> str | None:
    """The metric a task is usually quoted by: acc_norm, else acc, else its first non-stderr metric."""
    for name in ("acc_norm", "acc"):
        if name in metrics:
            return name
    return next((name for name in metrics if "stderr" not in name), None)


def _lm_eval_table(rows: list[Row]) -> list[str]:
    tasks = sorted({task for r in rows for task in r.lm_eval})
    if not tasks:
        return []
    metric = {task: headline_metric(next(r.lm_eval[task] for r in rows if task in r.lm_eval)) for task in tasks}
    lines = [
        "",
        "## lm-evaluation-harness",
        "",
        "| variant | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for r in rows:
        cells = []
        for task in tasks:
            values = r.lm_eval.get(task, {})
            err = values.get(f"{metric[task]}_stderr")
            cells.append(
                "–"
                if metric[task] not in values
                else f"{values[metric[task]]:.4f}" + (f" ± {err:.4f}" if err is not None else "")
            )
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


LABELLED_COLUMNS = 40  # precision map columns that still fit a label in each cell


def _pyplot():
    """matplotlib's pyplot on its file backend. Its font cache and config go under QUANTFLOW_HOME unless the user set
    MPLCONFIGDIR: left alone, matplotlib writes them to ~/.cache/matplotlib and ~/.config/matplotlib."""
    os.environ.setdefault("MPLCONFIGDIR", str(quantflow_home() / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter(
    points: list[tuple[str, float, float]], marked: list[str], labels: tuple[str, str, str], path: Path
) -> None:
    """One labelled scatter plot, rows on ``marked`` (a Pareto front) as stars joined by a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, x, y in points:
        ax.scatter(x, y, marker="*" if name in marked else "o", s=90 if name in marked else 30)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((x, y) for name, x, y in points if name in marked)
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", linewidth=0.8, color="grey")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def precision_map(precision: dict[str, str], title: str, path: Path) -> None:
    """Blocks x projections, each cell coloured by the option its layer took; layers outside the decoder blocks
    (the embedding and lm_head, when on the menu) get a row of their own, on top. A mixture's experts are columns
    of their own (``experts.3.down_proj``): the allocation treats each as a layer, and so does the map. Past
    ``LABELLED_COLUMNS`` columns (a real MoE has hundreds) the cells go unlabelled and the figure stops widening."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    from quantflow.quantization.mixed import map_cell

    cells = {map_cell(name): option for name, option in precision.items()}
    blocks = sorted({b for b, _ in cells if b is not None})
    blocks = [None, *blocks] if any(b is None for b, _ in cells) else blocks
    kinds = list(dict.fromkeys(k for _, k in sorted(cells, key=lambda cell: cell[0] is not None)))
    absent = len(OPTIONS)  # a block without that kind, or the outer row under a projection: blank
    grid = [[OPTIONS.index(cells[b, k]) if (b, k) in cells else absent for k in kinds] for b in blocks]
    labelled = len(kinds) <= LABELLED_COLUMNS
    width = 1.0 + (0.9 * len(kinds) if labelled else 0.12 * len(kinds))
    fig, ax = plt.subplots(figsize=(min(width, 40.0), 1.2 + 0.22 * len(blocks)))
    # OPTIONS (w4, w4g64, w4g32: blues; w6, w8: oranges; bf16: red), then absent
    colours = ListedColormap(["#dbe9f6", "#a9cce3", "#6fa8dc", "#f7d08a", "#f4a259", "#bc4b51", "#ffffff"])
    ax.imshow(grid, cmap=colours, vmin=0, vmax=absent, aspect="auto")
    for row, block in enumerate(blocks):
        for col, kind in enumerate(kinds if labelled else []):
            ax.text(col, row, cells.get((block, kind), ""), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30 if labelled else 90, ha="right", fontsize=8 if labelled else 4)
    ax.set_yticks(range(len(blocks)), ["outside" if b is None else b for b in blocks], fontsize=6)
    ax.set(ylabel="decoder block", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(report: Report, out: Path) -> list[Path]:
    """The plots named in PLOTS (speed plots only when the rows were timed), and each mixed row's precision map."""
    for row in report.rows:
        if row.precision:
            title = f"{row.name}: {row.allocated_bits} bits/weight ({' / '.join(OPTIONS)})" + (
                f"\ndominated by {row.dominated_by}" if row.dominated_by else ""
            )
            precision_map(row.precision, title, out / precision_file(row.name))
    paths = [out / "quality_vs_size.png"]
    scatter(
        [(r.name, r.size_mb, r.perplexity) for r in report.rows],
        report.pareto,
        ("weights size (MiB)", "perplexity (lower is better)", "Quality vs size (★ = Pareto front)"),
        paths[-1],
    )
    timed = [r for r in report.rows if r.speed]
    if not timed:
        return paths
    batch = min(s["batch"] for s in timed[0].speed)
    paths.append(out / "quality_vs_speed.png")
    scatter(
        [(r.name, first_decode(r), r.perplexity) for r in timed],
        report.pareto_speed,
        (f"decode tokens/s (batch {batch})", "perplexity (lower is better)", "Quality vs speed (★ = Pareto front)"),
        paths[-1],
    )
    paths.append(out / "throughput_vs_memory.png")
    scatter(
        [(r.name, r.peak_memory_mb, first_decode(r)) for r in timed],
        [],
        ("peak memory (MiB)", f"decode tokens/s (batch {batch})", "Throughput vs memory"),
        paths[-1],
    )
    return paths


def write_report(report: Report, out: Path) -> None:
    """report.json, report.md and the plots into ``out``, each file replaced whole (no reader sees half a report)."""
    with atomic_files(out) as scratch:
        (scratch / "report.json").write_text(report.model_dump_json(indent=2))
        (scratch / "report.md").write_text(markdown(report))
        plots(report, scratch)
        for row in report.rows:  # the table each allocation read, beside the report
            if row.sensitivity is not None:
                shutil.copyfile(row.sensitivity.path, scratch / sensitivity_file(row.name))


def load_report(path: Path) -> Report:
    return Report.model_validate_json(Path(path).read_text())


def model_card(report: Report, name: str) -> str:
    """A Hugging Face style README for one delivered variant."""
    row = next(r for r in report.rows if r.name == name)
    base = report.rows[0]
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [quantflow, compressed-tensors, " + row.method + "]",
            "---",
            "",
            f"# {report.model['source']} · {name}",
            "",
            f"Quantized by quantflow with `{row.method}` ({row.scheme or 'group size ' + str(row.group_size)}, "
            f"{row.effective_bits} bits per weight with scales) using llm-compressor; stored as compressed-tensors "
            "safetensors that vLLM and transformers load.",
            "",
            "| | baseline | this variant |",
            "|---|---|---|",
            f"| perplexity | {base.perplexity:.3f} | {row.perplexity:.3f} ({row.ppl_delta_pct:+.2f}%) |",
            f"| KL from baseline (nats/token) | 0 | {row.kl_mean} |",
            f"| weights MiB | {base.size_mb:.1f} | {row.size_mb:.1f} |",
            "",
            f"Protocol: {json.dumps(report.protocol)}. Calibration hash {report.calibration['hash']}. Layers "
            f"quantized: {row.quantized_layers}; skipped: {', '.join(row.skipped_layers) or 'none'}.",
            "",
        ]
    )
