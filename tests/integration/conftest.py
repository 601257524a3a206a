"""Real server processes for integration tests: a Prefect server on SQLite, started once per session."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

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
