"""A step process stops with the process that asked for it: killed, terminated or interrupted, a run leaves no step
computing (and no fork server waiting for it), and no result in the cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from quantflow.infra.cache import StepCache
from quantflow.infra.steps import cached, stop_steps

ROOT = Path(__file__).parents[2]
DEADLINE_S = 120  # generous: a loaded 2-core machine starts processes many times slower than a quiet one

# The requester: a process that runs one step, as `quantflow run` does. The step needs none of the heavy libraries
# the fork server preloads, so it leaves them out: the test takes seconds instead of a minute of imports.
REQUESTER = """
import sys
from pathlib import Path
from quantflow.infra import steps
from quantflow.infra.cache import StepCache
from tests.unit.test_step_stop import Done, spin
steps.PRELOAD.clear()
steps.cached(StepCache(Path(sys.argv[1])), "spin", "test", "k", Done, spin, marker=sys.argv[2])
"""


class Done(BaseModel):
    pid: int


def spin(out: Path, final: Path, marker: str) -> Done:
    """A step that never ends on its own: half a result in its scratch folder, its pid in ``marker``."""
    (out / "weights.bin").write_bytes(b"half")
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.01)


def wait_for(ready, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.1)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def step_pid(marker: Path) -> int:
    wait_for(lambda: marker.is_file() and marker.read_text(), "running step")
    return int(marker.read_text())


def assert_nothing_published(cache: Path) -> None:
    assert not (cache / "spin" / "k").exists()
    assert not list((cache / "spin").glob(".tmp-*")), "the stopped step left its scratch folder"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_step_stops_when_its_requester_is_killed(tmp_path, sig):
    """The step's parent is the fork server, not the requester: before the lifeline, the step computed on (minutes of
    GPTQ seen) and published its result, and the fork server waited for it."""
    marker = tmp_path / "pid"
    requester = subprocess.Popen(
        [sys.executable, "-c", REQUESTER, str(tmp_path / "cache"), str(marker)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
    )
    try:
        pid = step_pid(marker)
        fork_server = parent_of(pid)
        assert fork_server != requester.pid
        requester.send_signal(sig)
        assert requester.wait(timeout=DEADLINE_S) == -sig
        wait_for(lambda: not running(pid), f"end of the step process {pid}")
        wait_for(lambda: not running(fork_server), f"end of the fork server {fork_server}")
    finally:
        requester.kill()
    assert_nothing_published(tmp_path / "cache")


def test_stop_steps_stops_a_step_that_another_thread_waits_for(tmp_path):
    """What a Prefect flow needs when it is terminated: its task threads wait for their steps, and the flow waits for
    its task threads before it records the crash."""
    marker, raised = tmp_path / "pid", []

    def task() -> None:
        try:
            cached(StepCache(tmp_path / "cache"), "spin", "test", "k", Done, spin, marker=str(marker))
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=task)
    thread.start()
    pid = step_pid(marker)
    stop_steps()
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive(), "the thread still waits for its step"
    assert [type(error) for error in raised] == [KeyboardInterrupt]
    wait_for(lambda: not running(pid), f"end of the step process {pid}")
    assert_nothing_published(tmp_path / "cache")


def test_steps_spawn_where_a_cuda_device_is_visible(monkeypatch):
    """A fork server that imported torch and llm-compressor on a GPU machine hands out processes where CUDA cannot
    start (every GPU step failed): steps spawn there, and start from the fork server only on machines without one."""
    import torch

    from quantflow.infra import steps

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    steps._step_context.cache_clear()
    try:
        assert steps._step_context().get_start_method() == "spawn"
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        steps._step_context.cache_clear()
        assert steps._step_context().get_start_method() == "forkserver"
    finally:
        steps._step_context.cache_clear()
