"""What the Prefect UI shows of a run: its name, a comparison table, the report with its plots, links and samples.

The UI renders artifacts in a browser that cannot open ``file://`` links, so the plots are
embedded in the report's markdown as PNG data, and links (with a store) are presigned URLs.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE

from quantflow.reporting.report import PLOTS, Report, load_report, speed_columns
from quantflow.spec import RunSpec, short_model_name
from quantflow.sweep import grid_size
from tasks.credentials import store_credentials

KEY = "quantflow"


def run_name() -> str:
    """Flow runs named for what they do, e.g. 'smollm2-135m: rtn, gptq' (a variant run: 'smollm2-135m: gptq')."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    spec = (
        parameters["spec"]
        if isinstance(parameters.get("spec"), RunSpec)
        else RunSpec.model_validate(parameters.get("spec") or {})
    )
    if "variant" in parameters:
        what = parameters["variant"] or "baseline"
    else:
        what = ", ".join(
            [v.name for v in spec.variants] + ([f"sweep of {grid_size(spec.sweep)}"] if spec.sweep else [])
        )
    return f"{short_model_name(spec.model.source)}: {what}"


MB = 10**6 / 2**20  # the report's sizes are MiB; the table shows decimal megabytes, as file browsers do


def _or_dash(value: float | None, template: str) -> str:
    return "–" if value is None else template.format(value)


def comparison_rows(report: Report) -> list[dict]:
    """One row per variant, rounded for a reader (report.json keeps the full values), the best one marked; a decode
    column per batch size timed and the long-prompt prefill, the figures serving sees."""
    batches, long = speed_columns(report)
    rows = []
    for r in report.rows:
        decode = {s["batch"]: s["decode_tokens_per_s"] for s in r.speed}
        prefill = r.prefill["tokens_per_s"] if r.prefill else None
        rows.append(
            {
                "Variant": r.name + (" (best)" if r.name == report.best else ""),
                "Method": r.method,
                "Perplexity": f"{r.perplexity:.3f}",
                "Δ perplexity": f"{r.ppl_delta_pct:+.2f}%",
                "KL (nats/token)": _or_dash(r.kl_mean, "{:.4f}"),
                "Bits/weight": _or_dash(r.effective_bits, "{:.2f}"),
                "Size": f"{r.size_mb / MB:.1f} MB",
                "Size vs baseline": f"{r.size_ratio:.2f}×",
                "Peak memory": f"{r.peak_memory_mb / MB:.0f} MB",
                **{f"Decode (batch {b})": _or_dash(decode.get(b), "{:.1f} tok/s") for b in batches or [1]},
                **{f"Prefill ({n} tok)": _or_dash(prefill, "{:.0f} tok/s") for n in long},
                "Quantize": _or_dash(r.quantize_seconds, "{:.1f} s"),
            }
        )
    return rows


def best_sentence(report: Report) -> str:
    if report.best is None:
        return f"No variant qualifies: {report.best_reason}."
    row = next(r for r in report.rows if r.name == report.best)
    return (
        f"Best: {row.name} ({report.best_reason}): perplexity {row.perplexity:.3f} ({row.ppl_delta_pct:+.2f}%), "
        f"{row.size_mb:.1f} MiB ({row.size_ratio:.2f}x the baseline)."
    )


def embedded_plots(out: Path) -> list[str]:
    """Markdown images of the report's plots as PNG data, so the UI shows them inline."""
    lines = []
    for name, title in PLOTS.items():
        if (out / name).exists():
            data = base64.b64encode((out / name).read_bytes()).decode()
            lines += [f"![{title}](data:image/png;base64,{data})", ""]
    return lines


def inlined_images(markdown: str, out: Path) -> str:
    """The report's images that sit beside it (a mixed row's precision map) as PNG data: the UI has no folder."""

    def data(match: re.Match) -> str:
        image = out / match.group(2)
        if not image.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)", data, markdown)


def publish_run_artifacts(out: str | Path) -> None:
    """The comparison and the report, made by the flow itself: the UI lists a run's flow-level artifacts above its
    task runs' (each list in random order: Prefect sorts by uuid4), so these two come first."""
    out = Path(out)
    report = load_report(out / "report.json")
    sentence = best_sentence(report)
    create_table_artifact(
        comparison_rows(report), key=f"{KEY}-comparison", description=f"{report.model['source']}. {sentence}"
    )
    markdown = (out / "report.md").read_text()
    head, _, rest = markdown.partition("\n## Protocol")
    body = "\n".join([head, *embedded_plots(out), inlined_images("## Protocol" + rest, out) if rest else ""])
    create_markdown_artifact(body, key=f"{KEY}-report", description=sentence)


@task(name="progress", task_run_name="progress", cache_policy=NO_CACHE)
def progress_task() -> UUID:
    """The run's progress bar, made in a task so that it is listed below the comparison and report (see above)."""
    return create_progress_artifact(0.0, key=f"{KEY}-progress", description="variants finished (%)")


@task(name="links", task_run_name="links", cache_policy=NO_CACHE)
def links_task(out: str | Path, spec: RunSpec, report_uri: str) -> None:
    """Presigned links to the stored report and each variant's manifest, which a browser opens as they are; made in a
    task so that they are listed below the comparison and report."""
    from quantflow.delivery.store import endpoint, presigned_url

    report = load_report(Path(out) / "report.json")
    store = spec.output.store
    with store_credentials(spec):
        note = link_note(endpoint(store))
        create_link_artifact(
            presigned_url(store, report_uri, "report.md"),
            link_text="report.md in the store",
            key=f"{KEY}-report-link",
            description=f"{report_uri}. {note}",
        )
        for row in report.rows:
            if row.artifact_uri:
                create_link_artifact(
                    presigned_url(store, row.artifact_uri, "manifest.json"),
                    link_text=f"{row.name} manifest.json",
                    key=f"{KEY}-{row.name}-manifest".replace(".", "-").replace("_", "-"),
                    description=f"{row.artifact_uri}. {note}",
                )


def link_note(endpoint_url: str | None) -> str:
    """When a presigned link opens: while its signature lasts and the store answers; the local store stops with the
    demo, so its links say how to bring it back."""
    from quantflow.delivery.store import LINK_EXPIRES_S
    from quantflow.devtools.s3server import restart_command

    until = f"{datetime.now(timezone.utc) + timedelta(seconds=LINK_EXPIRES_S):%Y-%m-%d %H:%M} UTC"
    command = restart_command(endpoint_url)
    if command:
        return (
            f"The link opens only while the local store at {endpoint_url} runs, and until {until}. If it does not "
            f"open, the store is offline (the demo stops it when it ends): `{command}` brings it back with the same "
            "data at the same address."
        )
    where = f"the store at {endpoint_url}" if endpoint_url else "the store"
    return (
        f"The link opens while {where} answers, until {until} at the latest (sooner if the keys that signed it expire)."
    )
