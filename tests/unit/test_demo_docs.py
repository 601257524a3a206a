"""docs/demo.md's current table names every variant the demo runs, and the slow demo test's drift check catches a
number that moved."""

from __future__ import annotations

from types import SimpleNamespace

from quantflow.devtools.demo import demo_spec
from tests.slow.demo_docs import DOC_KERNELS, DOC_THREADS, documented_rows, drift, heading


def documented_as_rows() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            name=name,
            perplexity=float(cells["perplexity"]),
            ppl_delta_pct=float(cells["Δppl %"]),
            kl_mean=None if cells["KL nats/tok"] == "–" else float(cells["KL nats/tok"]),
        )
        for name, cells in documented_rows().items()
    ]


def test_the_table_lists_the_demos_variants():
    assert set(documented_rows()) == {"baseline", *(v.name for v in demo_spec().variants)}


def test_drift_flags_only_a_number_that_moved():
    rows = documented_as_rows()
    assert drift(rows) == {}
    gptq = next(r for r in rows if r.name == "gptq")
    gptq.perplexity += 0.1
    assert set(drift(rows)) == {"gptq"}


def test_the_heading_names_the_machine_the_drift_check_compares_on():
    assert DOC_KERNELS in heading() and f"{DOC_THREADS} torch threads" in heading()
