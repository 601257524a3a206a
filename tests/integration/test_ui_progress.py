"""Under Prefect the stages reach the UI: a few task log lines per stage and progress artifacts, no library lines."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import yaml

from tests.conftest import small_spec
from tests.integration.test_prefect_store import flow_logs

pytestmark = pytest.mark.integration


def test_task_logs_carry_stage_lines_and_progress_artifacts_not_library_output(prefect_server, tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "run", "--config", str(tmp_path / "spec.yaml")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**prefect_server, "PREFECT_LOGGING_LEVEL": "INFO"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = result.stdout.split("/runs/flow-run/")[1].split()[0]
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        logs = asyncio.run(flow_logs(run_id, until="report: done")).splitlines()
        with get_client(sync_client=True) as client:
            bars = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    assert "quantize rtn: started" in logs and any(m.startswith("evaluate rtn: done, perplexity") for m in logs)
    assert not [m for m in logs if "it/s]" in m or "Loading weights" in m or "Compressing model" in m]
    assert len(logs) < 60, logs
    described = {a.description for a in bars if str(a.flow_run_id) == run_id}
    assert {"evaluate rtn: 4 windows", "quantize rtn: 14 layers", "baseline: 4 windows"} <= described, described
    assert all(a.data == 100.0 for a in bars if str(a.flow_run_id) == run_id)
