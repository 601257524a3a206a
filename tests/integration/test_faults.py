"""The S3 secret key never appears in anything a run shows or leaves behind, on success and on failure.

Scanned: the CLI's console output, the flow run's logs and artifacts on the Prefect server, the
flow run's state message, every file of the output folder (report.json, report.md, model cards)
and every manifest in the store.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import small_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def cli_run(spec: dict, folder: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", "run", "--config", str(folder / "spec.yaml"), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )


async def everything_prefect_kept() -> str:
    """Logs, artifacts and state messages of every flow run on the server (the test's runs are the newest)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        runs = await client.read_flow_runs()
        ids = [run.id for run in runs]
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        states = [str(run.state.message) for run in runs if run.state]
    assert logs and artifacts, "nothing to scan: the runs left no logs or artifacts on the server"
    return "\n".join([log.message for log in logs] + [f"{a.data} {a.description}" for a in artifacts] + states)


def stored_manifests(spec: dict) -> str:
    from quantflow.delivery.store import client
    from quantflow.spec import StoreSpec

    store = StoreSpec(**spec["output"]["store"])
    s3 = client(store)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=store.bucket).get("Contents", [])]
    manifests = [
        s3.get_object(Bucket=store.bucket, Key=k)["Body"].read().decode() for k in keys if k.endswith("manifest.json")
    ]
    assert manifests, "the run stored no manifest"
    return "\n".join(manifests)


def output_files(folder: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace")
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".json", ".md", ".yaml")
    )


def test_the_secret_key_appears_nowhere_on_success_or_failure(
    prefect_server, s3_server, tiny_model, tmp_path, monkeypatch
):
    keys = s3_server.env()
    secret = keys["AWS_SECRET_ACCESS_KEY"]
    env = {**prefect_server, **keys, "PREFECT_LOGGING_LEVEL": "INFO"}
    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    spec["evaluation"]["speed"] = None
    spec["output"]["store"] = {"uri": f"s3://qf-{uuid.uuid4().hex[:8]}/team", "create_bucket": True}

    good = cli_run(spec, tmp_path, env)
    assert good.returncode == 0, good.stderr
    assert "stored: rtn -> s3://" in good.stdout

    wrong = f"wrong-secret-{uuid.uuid4().hex}"
    bad_spec = {**spec, "output": {**spec["output"], "dir": str(tmp_path / "bad-out")}}
    failures = [
        cli_run(bad_spec, tmp_path, {**env, "AWS_SECRET_ACCESS_KEY": wrong}, "--engine", engine)
        for engine in ("prefect", "local")
    ]
    for failure in failures:
        assert failure.returncode == 2 and "refused the credentials" in failure.stderr, failure.stderr
        assert "Traceback" not in failure.stdout + failure.stderr

    for key, value in {**keys, "PREFECT_API_URL": prefect_server["PREFECT_API_URL"]}.items():
        monkeypatch.setenv(key, value)
    kept = asyncio.run(everything_prefect_kept())
    assert "refused the credentials" in kept, "the failed run's logs or state should be among what was scanned"
    scanned = {
        "console": good.stdout + good.stderr + "".join(f.stdout + f.stderr for f in failures),
        "prefect logs, artifacts and states": kept,
        "output files": output_files(tmp_path / "out") + output_files(tmp_path / "bad-out"),
        "manifests": stored_manifests(spec),
    }
    for where, text in scanned.items():
        assert secret not in text, f"the secret key appears in the {where}"
        assert wrong not in text, f"the wrong secret key appears in the {where}"
