"""Prefect artifacts for a finished run: comparison table, report markdown, links to outputs."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from quantflow.report import load_report


def publish_run_artifacts(out: Path) -> None:
    report = load_report(out / "report.json")
    table = [{"variant": r.name, "method": r.method, "perplexity": r.perplexity, "ppl_delta_pct": r.ppl_delta_pct,
              "kl_mean_nats": r.kl_mean, "size_mib": r.size_mb, "peak_memory_mib": r.peak_memory_mb,
              "decode_tok_s_b1": next((s["decode_tokens_per_s"] for s in r.speed if s["batch"] == 1), None)} for r in report.rows]
    slug = "quantflow"
    create_table_artifact(table, key=f"{slug}-comparison", description=f"Variants of {report.model['source']}; best: {report.best}")
    create_markdown_artifact((out / "report.md").read_text(), key=f"{slug}-report", description="quantflow report.md")
    for name in ("report.json", "quality_vs_size.png", "throughput_vs_memory.png"):
        if (out / name).exists():
            key = f"{slug}-" + name.replace(".", "-").replace("_", "-")
            create_link_artifact(f"file://{(out / name).resolve()}", link_text=name, key=key, description=f"run output {name}")
