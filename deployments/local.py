"""A laptop deployment: a local Prefect server plus ``Flow.serve`` of the quantflow flow.

``Flow.serve`` is Prefect's lightest way to make a deployment runnable: this process polls the
server for runs of the deployment and executes them, so no work pool or worker is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from deployments.automations import HEARTBEAT_SECONDS, ensure_zombie_automation
from quantflow.errors import QuantflowError
from quantflow.spec import RunSpec

# a bound, not a delay: a fresh server answers in ~10 s on an idle 2-core machine, took over 90 s at load average 24
STARTUP_WAIT_S = 180


def start_server(port: int, home: Path) -> subprocess.Popen:
    """``prefect server start`` on loopback with its SQLite database under ``home``; waits for /api/health."""
    home.mkdir(parents=True, exist_ok=True)
    # the UI's pages ask the API at PREFECT_UI_API_URL, which Prefect derives from its default port, not --port
    ui_api = os.environ.get("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
    # SQLite takes one writer at a time; Prefect's default 10 s busy wait turned a burst of state writes (a sweep's
    # flow runs starting together on a loaded 2-core machine) into 503s that outlasted the clients' retries
    timeout = os.environ.get("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home.resolve()),
        "PREFECT_UI_API_URL": ui_api,
        "PREFECT_SERVER_DATABASE_TIMEOUT": timeout,
    }
    log = (home / "server.log").open("a")
    # `python -m prefect`, not the `prefect` script: an install with `pip --target` (a GPU image) has no script on PATH
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--analytics-off",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(server, port, home)
    except BaseException:  # Ctrl-C too: the server runs in its own session, where Ctrl-C does not reach it
        stop_group(server, signal.SIGKILL, 10)
        raise
    return server


def _wait_healthy(server: subprocess.Popen, port: int, home: Path) -> None:
    deadline = time.monotonic() + STARTUP_WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise QuantflowError(
                f"the Prefect server exited at start (see {home}/server.log)", f"is port {port} taken? pass --port"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise QuantflowError(
        f"the Prefect server did not answer on port {port} within {STARTUP_WAIT_S} s", f"see {home}/server.log"
    )


def stop_group(process: subprocess.Popen, sig: int, grace: float) -> None:
    """Signal a process group started with start_new_session; SIGKILL it if it outlives ``grace``."""
    os.killpg(process.pid, sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def stop_server(server: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the server's process group and wait until it has exited (SIGKILL after ``grace``).

    Waiting matters: the server runs in its own session, so Ctrl-C on ``quantflow serve`` does not
    reach it, and a ``serve`` that returned before its server was gone would leave the port
    answering for a few more seconds.
    """
    stop_group(server, signal.SIGTERM, grace)


def serve_locally(port: int, home: Path, announce: Callable[[str], None], spec: RunSpec | None = None) -> None:
    """Start the server on ``home`` and serve the flow until Ctrl-C; the Run form opens on ``spec`` (the demo's by
    default). The served runs run in this process's children: they keep their Prefect results in ``home`` too."""
    os.environ["PREFECT_HOME"] = str(home.resolve())  # before Prefect is imported below: it reads it once
    server = start_server(port, home)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    ensure_zombie_automation()
    try:
        from flows.quantize import quantflow_run
        from flows.run import ui_link
        from quantflow.devtools.demo import demo_spec

        # the form opens on the demo's spec by default: a run that fits a laptop's CPU as it stands (about 10 minutes)
        defaults = {"spec": (spec or demo_spec()).model_dump(mode="json")}
        served = {"name": "quantflow-local", "tags": ["quantflow", "local"], "parameters": defaults}
        deployment_id = quantflow_run.to_deployment(**served).apply()  # the id for the link; serve keeps it
        form = ui_link(f"http://127.0.0.1:{port}", f"deployments/deployment/{deployment_id}/run")
        announce(f"Prefect UI: http://127.0.0.1:{port}  run form: {form}  (Ctrl-C stops)")
        # Prefect's own starting message links the V1 UI (see ui_link)
        quantflow_run.serve(**served, print_starting_message=False)
    finally:
        stop_server(server)
