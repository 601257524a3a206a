"""The CLI's one console: a line per stage with its progress; everything the libraries print goes to a log file.

A run's libraries print a lot (llm-compressor's per-layer grid search, tqdm bars, transformers and torch warnings,
Prefect's task lines), from this process, from the temporary Prefect server and from the spawned processes that run
heavy steps. They all write to file descriptors 1 and 2, so those are pointed at a pipe for the run: children inherit
it, and a thread copies what arrives into ``<output>/quantflow.log``, keeping each repeated warning once and each tqdm
bar's last state. The display keeps a copy of the original terminal and draws the stages from the core's progress
events (``quantflow.infra.progress``). ``--verbose`` leaves the descriptors alone: everything reaches the console as
before, beside plain stage lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from quantflow.errors import QuantflowError
from quantflow.infra import progress
from quantflow.infra.cache import default_cache_root

LOG_NAME = "quantflow.log"
WARNING = re.compile(r"\S*warn", re.IGNORECASE)
NUMBERS = re.compile(r"\d+")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CURSOR_UP = "\x1b[A"  # a nested tqdm bar redraws its line in place with it


class LogCopier:
    """Copies what a pipe receives into the log file, line by line: a tqdm bar's redraws (carriage returns, or a nested
    bar's cursor-up) collapse to its last state, colours go, and a warning seen before (numbers and times aside) is
    dropped."""

    def __init__(self, pipe: int, log: IO[str], close: bool = False) -> None:
        self.pipe, self.log, self.seen, self.close = pipe, log, set(), close
        self.held: tuple[str, str] | None = None  # a nested bar's latest redraw: (its description, the line)
        self.last = time.monotonic()  # when the pipe last delivered
        self.thread = threading.Thread(target=self._copy, name="quantflow-log", daemon=True)
        self.thread.start()

    def drain(self, quiet: float = 1.0, longest: float = 30.0) -> None:
        """Wait until every writer has closed the pipe, or until it has been quiet for ``quiet`` seconds.

        Processes that outlive the block (the steps' fork server, a temporary Prefect server) hold the pipe open
        until this process exits; waiting for their end-of-file cost every command 30 s. What they print later
        still reaches the log: the copier keeps running until the pipe closes."""
        deadline = time.monotonic() + longest
        while self.thread.is_alive() and time.monotonic() < deadline:
            if time.monotonic() - self.last >= quiet:
                return
            self.thread.join(timeout=0.1)

    def _copy(self) -> None:
        pending = b""
        while chunk := os.read(self.pipe, 65536):
            self.last = time.monotonic()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self.write(line.decode("utf-8", errors="replace"))
        self.write(pending.decode("utf-8", errors="replace"))
        self._release()
        os.close(self.pipe)
        if self.close:
            self.log.close()

    def write(self, raw: str) -> None:
        line = next((part for part in reversed(ANSI.sub("", raw).split("\r")) if part.strip()), "")
        if raw.rstrip().endswith(CURSOR_UP) and line:
            bar = line.split(":", 1)[0]
            if self.held and self.held[0] != bar:
                self._release()
            self.held = (bar, line)
            return
        self._release()
        if warning := WARNING.search(line):  # keyed from the word on: a tqdm bar's state may precede it
            key = NUMBERS.sub("#", line[warning.start() :])
            if key in self.seen:
                return
            self.seen.add(key)
        if line:
            self._put(line)

    def _release(self) -> None:
        if self.held:
            self._put(self.held[1])
            self.held = None

    def _put(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()


@contextlib.contextmanager
def captured(log_path: Path) -> Iterator[IO[str]]:
    """Point descriptors 1 and 2 (this process's and every child's) at the log for the block; yield the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read, write = os.pipe()
    copier = LogCopier(read, open(log_path, "a", encoding="utf-8"), close=True)  # closed at the pipe's end
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        copier.drain()
        terminal.close()


class StageDisplay:
    """Draws progress events: on a terminal a live bar per stage, elsewhere (a pipe, a file, --verbose) a line when
    a stage starts and when it ends."""

    def __init__(self, file: IO[str], live: bool) -> None:
        self.console = Console(file=file, highlight=False, soft_wrap=True)
        self.live = live and self.console.is_terminal
        self.bars = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[count]:>14}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[outcome]}"),
            console=self.console,
        )
        self.log: Path | None = None  # the run's log file; None with --verbose
        self.rows: dict[str, TaskID] = {}
        self.counts: dict[str, str] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> StageDisplay:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bars.stop()

    def say(self, text: str) -> None:
        self.console.print(text, markup=False)

    def __call__(self, event: progress.Event) -> None:
        with self.lock:
            if event.state == "advance":
                self.counts[event.stage] = f"{event.done}/{event.total} {event.unit}" if event.total else ""
            if self.live:
                self._draw(event)
            else:
                self._line(event)

    def _draw(self, event: progress.Event) -> None:
        if event.state == "note":
            self.say(f"! {event.stage}: {event.message}")
            return
        if event.state == "start":
            self.rows[event.stage] = self.bars.add_task(event.stage, total=None, count="", outcome="")
        row = self.rows.get(event.stage)
        if row is None:
            return
        if event.state == "advance" and event.total:
            self.bars.update(row, completed=event.done, total=event.total, count=self.counts[event.stage])
        elif event.state in ("done", "failed"):
            total = next(task.total for task in self.bars.tasks if task.id == row) or 1
            outcome = event.message if event.state == "done" else f"failed: {event.message}"
            self.bars.update(row, completed=total if event.state == "done" else None, total=total, outcome=outcome)
            self.bars.stop_task(row)

    def _line(self, event: progress.Event) -> None:
        count = self.counts.get(event.stage, "")
        if event.state == "start":
            self.say(f"  {event.stage} ...")
        elif event.state == "done":
            self.say(f"✓ {event.stage:<24} {count:>16}  {event.message}")
        elif event.state == "failed":
            self.say(f"✗ {event.stage:<24} {count:>16}  failed: {event.message}")
        elif event.state == "note":
            self.say(f"! {event.stage}: {event.message}")


@contextlib.contextmanager
def run_console(output: Path, verbose: bool) -> Iterator[StageDisplay]:
    """The console of one run: the stage display, and unless ``verbose`` the log file in ``output``, named at the
    start and at the end (by the caller after the results; here when the run fails). A failed run that had to create
    ``output`` leaves nothing there: its log moves beside the step cache."""
    if verbose:
        with StageDisplay(sys.stderr, live=False) as display, progress.listening(display):
            yield display
        return
    created = _topmost_missing(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        log = (output / LOG_NAME).resolve()
    except OSError:  # the run's plan names the problem with its fix; the log waits in a temporary file meanwhile
        log, created = Path(tempfile.mkstemp(prefix="quantflow-", suffix=".log")[1]), None
    try:
        with captured(log) as terminal, StageDisplay(terminal, live=True) as display, progress.listening(display):
            display.log = log
            display.say(f"log: {log} (library output; --verbose prints it here)")
            yield display
    except BaseException as error:
        ours = created is None or {p.name for p in output.iterdir()} == {LOG_NAME}  # nothing but our log there
        if ours and isinstance(error, QuantflowError):  # refused input: the one-line error says it all, nothing stays
            log.unlink(missing_ok=True)
            if created is not None:
                shutil.rmtree(created)
            raise
        if ours:
            log = Path(shutil.move(log, _spare_log(output)))
            if created is not None:
                shutil.rmtree(created)
        print(f"log: {log}", file=sys.stderr)
        raise


def _topmost_missing(folder: Path) -> Path | None:
    """The outermost folder that creating ``folder`` would create (None when it exists): what a refused run removes."""
    missing = None
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            return missing
        missing = candidate
    return missing


def _spare_log(output: Path) -> Path:
    """Where a run's log goes when its output folder cannot hold it: beside the step cache, under QUANTFLOW_HOME."""
    folder = default_cache_root().parent / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{output.name}.log"
