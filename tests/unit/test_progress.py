"""Progress events: a child process's steps reach the subscribers of the thread that started it, and only those."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time

from deployments.console import LogCopier, captured
from quantflow.infra import progress
from quantflow.infra.steps import isolated


def count_to(n: int) -> int:
    for done in range(1, n + 1):
        progress.advance(done, n, "things")
    return n


def test_a_child_process_reports_to_the_stage_that_started_it():
    """Another thread's subscriber (a Prefect task running beside this one) sees none of it."""
    mine, theirs, finished = [], [], threading.Event()

    def beside() -> None:
        with progress.subscribed(theirs.append):
            finished.wait(timeout=120)

    other = threading.Thread(target=beside)
    other.start()
    with progress.subscribed(mine.append), progress.stage("count") as shown:
        assert isolated("count", 120, count_to, 3) == 3
        shown.outcome = "3 things"
    finished.set()
    other.join()
    assert [(e.state, e.done, e.total) for e in mine] == [
        ("start", 0, None),
        ("advance", 1, 3),
        ("advance", 2, 3),
        ("advance", 3, 3),
        ("done", 0, None),
    ]
    assert {e.stage for e in mine} == {"count"} and mine[-1].message == "3 things" and not theirs


def test_a_failed_stage_says_so_with_the_first_line_of_its_error():
    seen = []
    try:
        with progress.subscribed(seen.append), progress.stage("plan"):
            raise ValueError("no model here\nmore detail")
    except ValueError:
        pass
    assert (seen[-1].state, seen[-1].message) == ("failed", "no model here")


def test_the_log_keeps_each_bars_last_state_and_each_warning_once():
    read, write = os.pipe()
    log = io.StringIO()
    copier = LogCopier(read, log)
    lines = [
        "Loading:   0%|  | 0/3\rLoading: 100%|##| 3/3",
        "2026-12-04T13:24:56.25 | get_main_device | WARNING - No accelerator available!",
        "Smoothing: 33%|#| 1/3 2026-12-04T13:25:53.13 | get_main_device | WARNING - No accelerator available!",
        "Grid search for layers.0:   0%|  | 0/20 [00:00<?, ?it/s]\x1b[A",
        "Grid search for layers.0:  50%|# | 10/20 [00:01<00:01, 9.1it/s]\x1b[A",
        "Grid search for layers.1:   0%|  | 0/20 [00:00<?, ?it/s]\x1b[A",
        "Grid search for layers.1: 100%|##| 20/20 [00:02<00:00, 9.3it/s]\x1b[A",
        "done",
    ]
    os.write(write, ("\n".join(lines) + "\n").encode())
    os.close(write)
    copier.thread.join(timeout=10)
    assert log.getvalue().splitlines() == [
        "Loading: 100%|##| 3/3",
        "2026-12-04T13:24:56.25 | get_main_device | WARNING - No accelerator available!",
        "Grid search for layers.0:  50%|# | 10/20 [00:01<00:01, 9.1it/s]",
        "Grid search for layers.1: 100%|##| 20/20 [00:02<00:00, 9.3it/s]",
        "done",
    ]


def test_a_child_that_outlives_the_block_does_not_hold_the_console_and_still_reaches_the_log(tmp_path):
    """The steps' fork server and a temporary Prefect server keep the log pipe open until the command exits: leaving
    the block waited for their end-of-file, 30 s on every command. It now waits only until the pipe is quiet, and
    what such a child prints later still lands in the log."""
    log = tmp_path / "quantflow.log"
    with captured(log):
        child = subprocess.Popen(["sh", "-c", "echo early; sleep 3; echo late; sleep 120"])
        time.sleep(0.5)
        leaving = time.monotonic()
    left = time.monotonic()
    try:
        assert left - leaving < 15, left - leaving  # was 30: the wait for the child's end-of-file
        assert "early" in log.read_text()
        deadline = left + 60
        while "late" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "late" in log.read_text()
    finally:
        child.kill()
        child.wait()
