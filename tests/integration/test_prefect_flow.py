"""The quantflow flow on a real Prefect server: deploy from prefect.yaml, trigger as the UI does,
a real process worker runs it, artifacts appear, and a repeat run is served from the cache."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import small_spec
from tests.integration.conftest import BIN, stop_group

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def prefect(env, *args, timeout=180):
    result = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def deployed(prefect_server):
    env = {**prefect_server, "QUANTFLOW_ROOT": str(ROOT)}
    pools = {"quantflow-gpu": "process", "quantflow-local": "process", "quantflow-docker": "docker", "quantflow-k8s": "kubernetes"}
    for pool, kind in pools.items():
        template = ["--base-job-template", f"deployments/pools/{kind}-gpu.json"] if pool != "quantflow-local" else []
        prefect(env, "work-pool", "create", pool, "--type", kind, "--overwrite", *template)
    output = prefect(env, "--no-prompt", "deploy", "--all")
    assert "quantflow/nightly" in output and "quantflow/on-demand" in output and "quantflow/local" in output
    return env


@pytest.fixture
def worker(deployed, tmp_path):
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "quantflow-local", "--limit", "1"],
                               env=deployed, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield process
    stop_group(process, signal.SIGKILL, 10)


async def trigger_and_wait(spec: dict, timeout: float = 600):
    """Create a flow run of quantflow/local through the API, as the UI's Run button does, and wait for it."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("quantflow/local")
        run = await client.create_flow_run_from_deployment(deployment.id, parameters={"spec": spec})
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            run = await client.read_flow_run(run.id)
            if run.state and run.state.is_final():
                return run, time.monotonic() - start
            await asyncio.sleep(1)
    raise TimeoutError("flow run did not finish")


async def run_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_deployment_ui_trigger_worker_artifacts_and_cache(deployed, worker, tiny_model, tmp_path, monkeypatch):
    for key, value in deployed.items():
        monkeypatch.setenv(key, value)
    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}, {"method": "bnb-int8"}])
    first, first_seconds = asyncio.run(trigger_and_wait(spec))
    assert first.state.is_completed(), first.state
    assert (tmp_path / "out" / "rtn" / "model.safetensors").is_file() and (tmp_path / "out" / "report.json").is_file()
    artifacts = {a.key: a for a in asyncio.run(run_artifacts(first.id)) if a.key}
    assert artifacts["quantflow-comparison"].type == "table" and "rtn" in str(artifacts["quantflow-comparison"].data)
    assert "quantflow report" in artifacts["quantflow-report"].data
    assert "report.json" in artifacts["quantflow-report-json"].data
    assert artifacts["quantflow-progress"].type == "progress" and artifacts["quantflow-progress"].data == 100
    second, second_seconds = asyncio.run(trigger_and_wait(spec))
    assert second.state.is_completed()
    assert second_seconds < 0.5 * first_seconds, (first_seconds, second_seconds)


def test_invalid_spec_is_refused_at_submission(deployed, monkeypatch):
    for key, value in deployed.items():
        monkeypatch.setenv(key, value)
    result = subprocess.run([str(BIN / "prefect"), "deployment", "run", "quantflow/local", "--param", 'spec={"variants": [{"method": "gptq", "bits": 5}]}'],
                            env=deployed, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "bits" in (result.stdout + result.stderr)
