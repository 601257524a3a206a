"""The CLI: exit codes and messages for people."""

import subprocess
import sys

import pytest

from tests.conftest import small_spec


def quantflow(*args, cwd=None, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def test_unknown_method_exits_2_with_the_fix():
    result = quantflow("run", "--methods", "gptq,squeeze")
    assert result.returncode == 2
    assert (
        "unknown variant method 'squeeze'" in result.stderr
        and "fix:" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_missing_model_folder(tmp_path):
    """A failed run on a temporary Prefect server, as a user with no Prefect settings starts it: the error once, and
    nothing written but under QUANTFLOW_HOME (Prefect wrote ~/.prefect before)."""
    import os

    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"HOME": str(tmp_path / "home"), "QUANTFLOW_HOME": str(tmp_path / "qf")}
    result = quantflow("run", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"), env=env)
    assert result.returncode == 2 and result.stderr.count("error: model source") == 1, result.stderr
    assert "neither an existing folder nor a hub id" in result.stderr
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "home").rglob("*")) == [] and (tmp_path / "qf" / "prefect" / "prefect.db").is_file()


def test_bad_yaml_field(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("variants:\n  - {method: gptq, bits: 5}\n")
    result = quantflow("run", "--config", str(spec))
    assert result.returncode == 2 and "variants.0.gptq.bits" in result.stderr


def test_a_non_positive_gpu_budget_is_refused_with_the_field_named():
    result = quantflow("run", "--gpu-memory-gb", "0")
    assert result.returncode == 2 and "gpu_memory_gb" in result.stderr and "greater than 0" in result.stderr


def test_doctor_prints_the_matrix():
    result = quantflow("doctor")
    assert "llmcompressor" in result.stdout and "bitsandbytes variants" in result.stdout


def test_run_from_yaml_then_report_with_new_constraints(tiny_model, tmp_path):
    import yaml

    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    spec["evaluation"]["speed"] = None
    spec["evaluation"]["kl_tokens"] = 0  # no stored baseline log-probs, no KL column
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = quantflow("run", "--config", str(tmp_path / "spec.yaml"), "--engine", "local")
    assert result.returncode == 0, result.stderr
    assert "| rtn | rtn |" in result.stdout
    from quantflow.reporting.report import load_report

    assert [r.kl_mean for r in load_report(tmp_path / "out" / "report.json").rows] == [None, None]
    result = quantflow("report", str(tmp_path / "out" / "report.json"), "--max-ppl-increase", "1000")
    assert result.returncode == 0 and "best: rtn" in result.stdout
    result = quantflow("report", str(tmp_path / "out" / "report.json"), "--max-size-ratio", "0.01")
    assert "best: None" in result.stdout and "size <= 0.01x baseline" in result.stdout
    for flag, value, words in (
        ("--max-size-ratio", "5", "less than or equal to 1"),
        ("--max-ppl-increase", "-1", "greater than or equal to 0"),
    ):
        result = quantflow("report", str(tmp_path / "out" / "report.json"), flag, value)
        assert (
            result.returncode == 2
            and f"({flag}): Input should be {words}" in result.stderr
            and "Traceback" not in result.stderr
        )


def test_a_temporary_prefect_server_that_does_not_answer_is_one_clear_error(tiny_model, tmp_path):
    """What a loaded machine did: the temporary server answered after Prefect stopped waiting (forced here with a 0 s
    wait)."""
    import os

    import yaml

    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0",
    }
    result = quantflow("run", "--config", str(tmp_path / "spec.yaml"), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        "did not answer within 0 s" in result.stderr
        and "quantflow serve" in result.stderr
        and "PREFECT_API_URL" in result.stderr
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_the_temporary_server_gets_quantflows_longer_startup_wait_when_the_user_sets_none(monkeypatch):
    """Prefect reads its environment once, at import: the wait must reach it through its settings context (setting
    the variable at run time left Prefect's 20 s, seen failing a loaded CI machine). The flow is replaced by one that
    fails as a server that never answered does, so only the wait Prefect would use is under test."""
    import pytest
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    import flows.run
    from quantflow.errors import QuantflowError

    seen = []

    def unanswered(spec, return_state):
        seen.append(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setattr(flows.run, "quantflow_run", unanswered)
    with pytest.raises(QuantflowError, match=f"did not answer within {flows.run.STARTUP_WAIT_S} s"):
        flows.run.run_flow(None)
    assert seen == [flows.run.STARTUP_WAIT_S]


@pytest.mark.parametrize(
    ("database", "said"),
    [
        (
            "postgresql://bob:s3cret-pw@127.0.0.1:1/prefect",
            "cannot connect to the PostgreSQL at postgresql+asyncpg://bob:***@",
        ),
        ("postgres://bob:s3cret-pw@db-host:port/prefect", "--database is not a valid PostgreSQL URL"),
        ("postgres", "initdb: error: could not access directory"),
        ("mysql://bob:s3cret-pw@db-host/prefect", "unknown database"),
    ],
)
def test_a_database_the_server_cannot_use_is_one_clear_error_before_prefect_starts(tmp_path, database, said):
    """A wrong URL (refused, malformed) or a local PostgreSQL that cannot start (its data folder is a file): the error
    and its fix, no traceback, none of the wheel's log, no password shown, no Prefect server started."""
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "prefect"
    args = ("--database", database, "--home", str(home), "--data", str(tmp_path / "a-file"), "--port", "1")
    result = quantflow("server", *args, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0].startswith("error: ") and said in lines[0] and lines[1].startswith("  fix: "), result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout and not home.exists()
