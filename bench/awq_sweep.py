"""AWQ settings on the demo protocol: perplexity and the cut of RTN's damage, one row per setting.

Runs quantflow's own pipeline (demo model, demo calibration and evaluation, W4 g64 asymmetric)
with RTN plus one AWQ variant per JSON argument; a shared cache means the baseline, the
calibration set and RTN are computed once across invocations.

    .venv/bin/python bench/awq_sweep.py '{"n_grid": 40, "duo_scaling": "both"}' '{"n_grid": 20, "observer": "mse"}'
    CALIBRATION='{"num_samples": 32, "seq_len": 512}' .venv/bin/python bench/awq_sweep.py '{"n_grid": 40, "duo_scaling":
    "both"}'

Cut = 1 - (awq - baseline) / (rtn - baseline); issue 2 asks for at least 50%.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    from quantflow import pipeline
    from quantflow.devtools.demo import demo_spec
    from quantflow.reporting.report import load_report
    from quantflow.spec import apply_overrides

    work = Path(os.environ.get("SWEEP_WORK", "/tmp/quantflow-awq-sweep"))
    scheme = {"group_size": 64, "symmetric": False}
    variants = [{"method": "rtn", **scheme}]
    variants += [
        {"method": "awq", "name": f"awq{i}", **scheme, **json.loads(arg)} for i, arg in enumerate(sys.argv[1:])
    ]
    calibration = {f"calibration.{k}": v for k, v in json.loads(os.environ.get("CALIBRATION", "{}")).items()}
    spec = apply_overrides(
        demo_spec(work / "out"),
        {**calibration, "variants": variants, "evaluation.speed": None, "output.cache_dir": str(work / "cache")},
    )
    report = load_report(
        pipeline.run(spec, progress=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)) / "report.json"
    )
    rows = {r.name: r for r in report.rows}
    base, rtn = rows["baseline"].perplexity, rows["rtn"].perplexity
    print(f"calibration: {report.calibration['samples']} samples, {report.calibration['tokens']} tokens")
    for i, arg in enumerate(sys.argv[1:]):
        row = rows[f"awq{i}"]
        print(
            f"{arg:60s} ppl {row.perplexity:.3f}  cut {1 - (row.perplexity - base) / (rtn - base):6.1%}  quantize "
            f"{row.quantize_seconds:.0f} s"
        )
    print(f"baseline {base:.3f}, rtn {rtn:.3f}")


if __name__ == "__main__":
    main()
