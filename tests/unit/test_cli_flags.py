"""Every `quantflow run` flag with one invalid value: exit 2, one message naming the flag or field and the fix,
no traceback, nothing written where a user would see it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from deployments.cli import app


def a_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    return str(tmp_path / "taken")


CASES = {
    "--config": (lambda t: str(t / "missing.yaml"), "spec file"),
    "--model": (lambda t: str(t / "no-such-model"), "neither an existing folder nor a hub id"),
    "--revision": (lambda t: "v9", "--revision applies to hub models"),
    "--methods": (lambda t: "gptq,squeeze", "unknown variant method 'squeeze'"),
    "--group-size": (lambda t: "100", "variants.0.rtn.group_size (--methods/--group-size): Input should be 8, 16, 32"),
    "--output": (a_file, "output.dir"),
    "--device": (lambda t: "gpu", "device (--device): Input should be 'auto', 'cpu' or 'cuda'"),
    "--gpu-memory-gb": (lambda t: "0", "gpu_memory_gb (--gpu-memory-gb): Input should be greater than 0"),
    "--num-samples": (
        lambda t: "0",
        "calibration.num_samples (--num-samples): Input should be greater than or equal to 1",
    ),
    "--seq-len": (lambda t: "8", "calibration.seq_len (--seq-len): Input should be greater than or equal to 16"),
    "--calibration": (lambda t: str(t / "missing.txt"), "does not exist"),
    "--window": (lambda t: "4", "evaluation.window (--window): Input should be greater than or equal to 16"),
    "--max-windows": (
        lambda t: "0",
        "evaluation.max_windows (--max-windows): Input should be greater than or equal to 1",
    ),
    "--cache-dir": (a_file, "output.cache_dir"),
    "--engine": (lambda t: "spark", "unknown engine 'spark'"),
}


def test_every_run_flag_has_a_case():
    run = next(command for command in app.registered_commands if command.callback.__name__ == "run")
    import inspect

    switches = {"--verbose"}  # takes no value, so none can be invalid
    flags = {"--" + name.replace("_", "-") for name in inspect.signature(run.callback).parameters}
    assert flags - switches == set(CASES)


@pytest.mark.parametrize("flag", sorted(CASES))
def test_an_invalid_flag_value_gives_one_clear_error(flag, tmp_path, monkeypatch):
    value, words = CASES[flag]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTFLOW_HOME", str(tmp_path / "home"))
    args = ["run", flag, value(tmp_path), "--engine", "local"] if flag != "--engine" else ["run", "--engine", "spark"]
    if flag == "--group-size":
        args += ["--methods", "rtn"]
    before = set(tmp_path.iterdir())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    message = result.stderr
    assert words in message and "fix:" in message and "Traceback" not in result.output, message
    assert set(tmp_path.iterdir()) == before, "a refused run must write nothing"


def test_a_refused_flag_prints_no_traceback_from_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "run", "--methods", "gptq", "--group-size", "48"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 2, result.stderr  # the error line and its fix line


# Values the command line itself refuses before quantflow sees them (a type, a missing argument, an unknown flag or
# command): click's usage errors, under either engine.
USAGE_ERRORS = {
    "run --num-samples abc (prefect)": (["run", "--engine", "prefect", "--num-samples", "abc"], "--num-samples"),
    "run --num-samples abc (local)": (["run", "--engine", "local", "--num-samples", "abc"], "--num-samples"),
    "run --gpu-memory-gb lots (prefect)": (["run", "--gpu-memory-gb", "lots"], "--gpu-memory-gb"),
    "run --window 1.5 (local)": (["run", "--engine", "local", "--window", "1.5"], "--window"),
    "run --seq-len (no value)": (["run", "--engine", "prefect", "--seq-len"], "--seq-len"),
    "run --frobnicate": (["run", "--frobnicate", "3"], "--frobnicate"),
    "report --max-ppl-increase abc": (["report", "r.json", "--max-ppl-increase", "abc"], "--max-ppl-increase"),
    "pull without a folder": (["pull", "s3://b/p/"], "dest"),
    "serve --port http": (["serve", "--port", "http"], "--port"),
    "an unknown command": (["quantise"], "quantise"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_a_value_the_command_line_refuses_is_one_error_and_its_fix(case, tmp_path, monkeypatch):
    args, words = USAGE_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert lines[1].startswith("  fix: ") and "--help" in lines[1], result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("engine", ["prefect", "local"])
def test_a_type_error_prints_one_error_from_a_real_process(engine, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "run", "--engine", engine, "--num-samples", "abc"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 2, result.stderr
    assert "'abc'" in result.stderr and "fix: " in result.stderr
