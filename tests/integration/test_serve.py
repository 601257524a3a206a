"""`quantflow serve`: a local Prefect server plus a served deployment the UI can run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from deployments.local import stop_group
from quantflow.devtools.demo import demo_spec
from tests.integration.conftest import BIN, free_port, wait_http

pytestmark = pytest.mark.integration


def test_serve_starts_a_server_and_registers_the_deployment(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    log = (tmp_path / "serve.log").open("w")  # shown below if `serve` ignored Ctrl-C and had to be killed
    process = subprocess.Popen(
        [str(BIN / "quantflow"), "serve", "--port", str(port), "--home", str(tmp_path / "prefect")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        # as from a terminal: a test run started in the background (`cmd &`) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 90)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/deployments/filter",
                data=b"{}",
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            found = {d["name"]: d for d in json.loads(urllib.request.urlopen(request, timeout=5).read())}
            if "quantflow-local" in found:
                break
            time.sleep(1)
        assert "quantflow-local" in found
        # the Run form opens on the demo's spec, which a laptop's CPU finishes in minutes
        assert found["quantflow-local"]["parameters"]["spec"] == demo_spec().model_dump(mode="json")
        # the browser UI asks this server, not Prefect's default port (it showed "Can't connect" with --port 4300)
        ui = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=5).read())
        assert ui["api_url"] == f"http://127.0.0.1:{port}/api", ui
    finally:
        stop_group(process, signal.SIGINT, 60)  # the runner pauses its deployment, then the server gets up to 10 s
        log.close()
    assert process.returncode != -signal.SIGKILL, (tmp_path / "serve.log").read_text()[-3000:]  # it stopped on Ctrl-C
    with pytest.raises(TimeoutError):  # Ctrl-C also stopped the server it started, before `serve` returned
        wait_http(f"http://127.0.0.1:{port}/api/health", 5)
