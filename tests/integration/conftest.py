"""Real server processes for integration tests: a Prefect server on SQLite, started once per session; and what the
Prefect UI does with a deployment: fill its Run form, submit it, show the run's state, logs and artifacts."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port (started as `quantflow serve` does); yields its
    environment."""
    from deployments.local import start_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    server = start_server(port, home)
    try:
        yield {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS server with an S3 gateway and access keys, on loopback."""
    from quantflow.devtools import s3server

    data = tmp_path_factory.mktemp("seaweedfs")
    server = s3server.start(data)
    yield server
    s3server.stop(data)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def form_parameters(deployment) -> dict[str, Any]:
    """What the UI's Run form submits when nothing is changed: each parameter as the deployment sets it, else its
    schema default."""
    properties = deployment.parameter_openapi_schema["properties"]
    return {
        **{name: field["default"] for name, field in properties.items() if "default" in field},
        **deployment.parameters,
    }


def form_item(deployment, definition: str, **typed) -> dict[str, Any]:
    """A list item as the form adds it (every field at its schema default), with what the user typed over it."""
    fields = deployment.parameter_openapi_schema["definitions"][definition]["properties"]
    return {**{name: field["default"] for name, field in fields.items() if "default" in field}, **typed}


@contextmanager
def prefect_api(url: str):
    """Talk to this server, whatever server an earlier test of this process pointed Prefect at (Prefect reads its
    environment once, at import)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


async def wait_final(run_id, timeout: float = 600):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            run = await client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            await asyncio.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish within {timeout} s")


async def run_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


async def run_logs(flow_run_id) -> list[str]:
    """The run's log lines as the UI's run page lists them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]
