"""docs/demo.md's "Current demo" table read back, so that a test holds it to what the demo prints.

The numbers hold for the stated machine only: GPTQ's and AWQ's rounding decisions follow the
float sums of their calibration statistics, whose order depends on the CPU kernels torch runs and its thread count.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantflow.infra.environment import cpu_kernels

DOC = Path(__file__).parents[2] / "docs" / "demo.md"
DOC_KERNELS, DOC_THREADS = "family 23 model 49, AVX2", 2  # the machine the table was measured on (its heading says)


def documented_machine() -> bool:
    """Whether this process runs the kernels and thread count the table's digits came from."""
    return cpu_kernels() == DOC_KERNELS and torch.get_num_threads() == DOC_THREADS


def heading() -> str:
    return DOC.read_text().split("\n## Current demo", 1)[1].splitlines()[0]


CHECKED = ("perplexity", "Δppl %", "KL nats/tok")


def documented_rows() -> dict[str, dict[str, str]]:
    """The first table under '## Current demo': variant -> its cells by header, as printed."""
    section = DOC.read_text().split("\n## Current demo", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(headers, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def printed(row) -> dict[str, str]:
    """A report row's numbers as the demo prints them (report.md: perplexity 3 decimals, Δ 2 with sign, KL 4)."""
    return {
        "perplexity": f"{row.perplexity:.3f}",
        "Δppl %": f"{row.ppl_delta_pct:+.2f}",
        "KL nats/tok": "–" if row.kl_mean is None else f"{row.kl_mean:.4f}",
    }


def drift(rows) -> dict[str, tuple[dict, dict]]:
    """Rows whose printed numbers differ from the documented ones (or are missing): name -> (documented, printed)."""
    documented = documented_rows()
    found = {}
    for row in rows:
        shown = printed(row)
        stated = {key: documented.get(row.name, {}).get(key) for key in CHECKED}
        if stated != shown:
            found[row.name] = (stated, shown)
    return found
