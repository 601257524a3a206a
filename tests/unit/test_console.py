"""The CLI's one console: a short stage display, the libraries' output in the run's log file, --verbose for all."""

from __future__ import annotations

import os
import re

import yaml

from tests.conftest import small_spec
from tests.unit.test_cli import quantflow

STAGES = ("plan", "calibration", "baseline", "quantize rtn", "evaluate rtn", "report")
LIBRARY = re.compile(r"it/s\]|Loading weights|Compressing model|Grid search|WARNING -|Task run '|Finished in state")


def run(model, tmp_path, methods, *flags, env=None):
    spec = small_spec(model, tmp_path / "out", tmp_path / "cache", [])
    spec["variants"] = [{"method": m, "group_size": 32} for m in methods]
    spec["evaluation"]["speed"] = None  # seconds of timing that show nothing here
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # a generous bound: seconds on an idle machine, over 10 minutes on a shared 2-core one (seen)
    return quantflow("run", "--config", str(tmp_path / "spec.yaml"), *flags, env=env, timeout=2400)


def console_of(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_local_run_shows_stages_with_steps_and_logs_the_libraries_once(tiny_model, tmp_path):
    """AWQ's grid search prints hundreds of tqdm lines and its warnings repeat for every layer: none reach the
    console, the log file keeps them with each warning once."""
    result = run(tiny_model, tmp_path, ["rtn", "awq"], "--engine", "local")
    console = console_of(result)
    log = tmp_path / "out" / "quantflow.log"
    lines = console.splitlines()
    assert len(lines) < 60, console
    assert not [line for line in lines if LIBRARY.search(line)], console
    for stage in (*STAGES, "quantize awq", "evaluate awq"):
        assert re.search(rf"^✓ {stage} ", console, re.MULTILINE), stage
    assert re.search(r"^✓ quantize awq +14/14 layers", console, re.MULTILINE), console
    assert re.search(r"^✓ evaluate awq +4/4 windows +perplexity \d", console, re.MULTILINE), console
    assert result.stderr.startswith(f"log: {log} ") and result.stdout.splitlines()[-1] == f"log: {log}"
    logged = log.read_text()
    assert "Grid search for model.layers.1" in logged and "Loading weights" in logged
    assert logged.count("No accelerator available") == 1  # llm-compressor warns once per layer and process


def test_prefect_run_keeps_prefect_and_library_lines_in_the_log_and_records_the_run(tiny_model, tmp_path):
    """No PREFECT_API_URL: a temporary server on PREFECT_HOME's SQLite records the run for `quantflow serve`, and the
    console ends by saying where to see it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect")
    }
    console = console_of(run(tiny_model, tmp_path, ["rtn"], env=env))
    assert "Traceback" not in console  # e.g. the server's telemetry heartbeat racing SQLite
    assert f"is recorded in {tmp_path / 'prefect'}" in console and "http://127.0.0.1:4200/v2/runs/flow-run/" in console
    assert "quantflow-comparison" in console
    assert (tmp_path / "prefect" / "prefect.db").is_file() and (
        tmp_path / "out" / "rtn" / "model.safetensors"
    ).is_file()
    lines = console.splitlines()
    assert len(lines) < 45, console
    assert not [line for line in lines if LIBRARY.search(line)], console
    for stage in STAGES:
        assert re.search(rf"^✓ {stage} ", console, re.MULTILINE), stage
    assert "runs/flow-run/" in console and "quantflow-report" in console  # the end still names the run
    logged = (tmp_path / "out" / "quantflow.log").read_text()
    assert "Finished in state Completed()" in logged and "Compressing model" in logged


def test_verbose_prints_the_libraries_here(tiny_model, tmp_path):
    console = console_of(run(tiny_model, tmp_path, ["rtn"], "--engine", "local", "--verbose"))
    assert "Loading weights" in console and "Compressing model" in console
    assert re.search(r"^✓ quantize rtn ", console, re.MULTILINE)
    assert not (tmp_path / "out" / "quantflow.log").exists()


def test_a_failed_run_prints_its_one_line_error_and_leaves_no_output_folder(tmp_path):
    result = run(
        tmp_path / "no-model",
        tmp_path,
        ["rtn"],
        "--engine",
        "local",
        env={**os.environ, "QUANTFLOW_HOME": str(tmp_path)},
    )
    assert result.returncode == 2 and "error: " in result.stderr and "fix: " in result.stderr
    assert "✗ plan" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    # refused input writes nothing: the one-line error is the whole story, so no log is kept anywhere either
    assert not (tmp_path / "logs").exists() and not re.search(r"^log: (\S+)$", result.stderr, re.MULTILINE)
