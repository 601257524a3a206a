"""The Prefect engine on a mixture of experts: a variant that fails is a report row, and the run completes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from quantflow.pipeline import run as run_pipeline
from quantflow.reporting.report import load_report
from quantflow.spec import parse_spec
from tests.conftest import small_spec
from tests.integration.conftest import BIN
from tests.moe_models import make_moe

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_a_failed_variant_is_a_row_under_the_prefect_engine(prefect_server, tmp_path):
    """RTN with zero points is computed first (local engine, same cache); then the flow runs it (cached) beside AWQ,
    whose quantize step is killed by a 50 ms step timeout: the flow finishes, the report has both."""
    model = make_moe(tmp_path / "model")
    variants = [{"method": "rtn", "symmetric": False}]
    raw = small_spec(model, tmp_path / "out", tmp_path / "cache", variants, speed=None, max_windows=2, kl_tokens=32)
    run_pipeline(parse_spec(raw), progress=lambda _: None)
    raw["variants"] = [*variants, {"method": "awq", "n_grid": 4}]
    raw["step_timeout_s"] = 0.05  # no quantize step finishes in 50 ms: a fixed outcome, not a race
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [str(BIN / "quantflow"), "run", "-c", str(tmp_path / "spec.yaml"), "--engine", "prefect"],
        env={**prefect_server, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = load_report(tmp_path / "out" / "report.json")
    assert [r.name for r in report.rows] == ["baseline", "rtn"]
    (failed,) = report.failed
    assert (failed.name, failed.stage) == ("awq", "quantize")
    assert failed.error.startswith("method awq could not quantize this qwen3_moe model: step 'quantize' ran longer")
