"""SIGTERM to `quantflow run` (a service manager's stop, `docker stop`, `kill`) stops it as Ctrl-C does, under both
engines: its step process ends, nothing half-done enters the cache, the console says so without a traceback, the
exit code is 143, and a Prefect flow run ends Crashed on the server instead of staying Running."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import small_spec
from tests.integration.conftest import prefect_api
from tests.unit.test_step_stop import running

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
DEADLINE_S = 600  # generous: a loaded 2-core machine runs these many times slower than a quiet one


def start_run(tiny_model: Path, folder: Path, env: dict, engine: str) -> subprocess.Popen:
    """A run whose baseline step times generation a million times (hours): only a stop ends it."""
    spec = small_spec(tiny_model, folder / "out", folder / "cache", [{"method": "rtn", "group_size": 32}])
    spec["evaluation"]["speed"]["repeats"] = 1_000_000
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "run", "--config", str(folder / "spec.yaml"), "--engine", engine],
        stdout=(folder / "console.out").open("w"),
        stderr=(folder / "console.err").open("w"),
        cwd=ROOT,
        env={**env, "QUANTFLOW_HOME": str(folder / "home")},
        start_new_session=True,  # only the CLI gets the signal, as from a service manager (Ctrl-C signals the group)
    )


def step_process(cache: Path, run: subprocess.Popen) -> int:
    """The pid of the baseline's step process, from its scratch folder's name (.tmp-<key>-<host>-<pid>-<random>)."""
    deadline = time.monotonic() + DEADLINE_S
    while not (scratch := list((cache / "evaluate").glob(".tmp-*"))):
        assert run.poll() is None, f"the run ended before its baseline step: rc {run.returncode}"
        assert time.monotonic() < deadline, f"no baseline step within {DEADLINE_S} s"
        time.sleep(0.2)
    return int(scratch[0].name.rsplit("-", 2)[1])


async def flow_run_state(out: Path) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as prefect:
        newest = await prefect.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
    states = [r.state for r in newest if r.parameters["spec"]["output"]["dir"] == str(out)]
    return states[0].type.value if states and states[0] else None


@pytest.mark.parametrize("engine", ["local", "prefect"])
def test_sigterm_stops_the_run_and_its_step(engine, tiny_model, tmp_path, request):
    env = request.getfixturevalue("prefect_server") if engine == "prefect" else dict(os.environ)
    run = start_run(tiny_model, tmp_path, env, engine)
    try:
        step = step_process(tmp_path / "cache", run)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=DEADLINE_S) == 128 + signal.SIGTERM
        deadline = time.monotonic() + DEADLINE_S
        while running(step):
            assert time.monotonic() < deadline, f"the step process {step} outlived its run by {DEADLINE_S} s"
            time.sleep(0.2)
    finally:
        os.killpg(run.pid, signal.SIGKILL) if run.poll() is None else None
    console = (tmp_path / "console.err").read_text()
    assert "stopped (SIGTERM)" in console and "Traceback" not in console, console
    assert not list((tmp_path / "cache" / "evaluate").iterdir()), "the stopped step left files in the cache"
    if engine == "prefect":
        with prefect_api(env["PREFECT_API_URL"]):
            assert asyncio.run(flow_run_state(tmp_path / "out")) == "CRASHED"
