"""The comparison table the Prefect UI shows: numbers rounded for a reader, units in the cells."""

from quantflow.reporting.report import Report, Row
from tasks.artifacts import comparison_rows


def row(**values) -> Row:
    base = dict(
        name="gptq",
        method="gptq",
        perplexity=16.74962,
        ppl_delta_pct=10.4512,
        kl_mean=0.123456,
        effective_bits=4.5123,
        size_mb=100.0,
        size_ratio=0.37219,
        peak_memory_mb=1234.5,
        speed=[{"batch": 1, "decode_tokens_per_s": 41.278}, {"batch": 4, "decode_tokens_per_s": 120.0}],
        quantize_seconds=68.94,
        prefill={"prompt_len": 2048, "tokens_per_s": 5321.44, "ms": 384.9, "repeats": 3},
    )
    return Row.model_construct(**{**base, **values})


def test_cells_are_rounded_with_sign_and_units():
    rtn = row(name="rtn", method="rtn", ppl_delta_pct=-0.5, speed=[{"batch": 1, "decode_tokens_per_s": 50.0}])
    report = Report.model_construct(rows=[row(), rtn], best="gptq")
    best, rtn = comparison_rows(report)
    assert best == {
        "Variant": "gptq (best)",
        "Method": "gptq",
        "Perplexity": "16.750",
        "Δ perplexity": "+10.45%",
        "KL (nats/token)": "0.1235",
        "Bits/weight": "4.51",
        "Size": "104.9 MB",
        "Size vs baseline": "0.37×",
        "Peak memory": "1294 MB",
        "Decode (batch 1)": "41.3 tok/s",
        "Decode (batch 4)": "120.0 tok/s",
        "Prefill (2048 tok)": "5321 tok/s",
        "Quantize": "68.9 s",
    }
    assert rtn["Δ perplexity"] == "-0.50%" and rtn["Variant"] == "rtn"
    assert rtn["Decode (batch 4)"] == "–"  # not timed at that batch: the column stays, the cell says so


def test_missing_measurements_show_a_dash():
    report = Report.model_construct(
        rows=[row(kl_mean=None, effective_bits=None, speed=[], quantize_seconds=None, prefill=None)], best=None
    )
    (cells,) = comparison_rows(report)
    assert [cells[k] for k in ("KL (nats/token)", "Bits/weight", "Decode (batch 1)", "Quantize")] == ["–"] * 4
