"""Progress events: each stage of a run says when it starts, how far along it is, and how it ended.

The core emits plain ``Event`` records; whoever shows them subscribes a callback: the CLI's
display, a Prefect task's log lines and progress artifact. Nothing here imports rich or
Prefect. Stages run in Prefect's task threads and their heavy steps in spawned child
processes (``quantflow.infra.steps.isolated``): the current stage and the subscribers live in
context variables, which Prefect copies into its task threads, and a child's events travel
back over a pipe (``ChildEvents``) to the subscribers of the thread that started it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["start", "advance", "note", "done", "failed"]


@dataclass(frozen=True)
class Event:
    """One thing a stage did: started, reached ``done`` of ``total`` ``unit``, said something, ended."""

    stage: str
    state: State
    done: int = 0
    total: int | None = None
    unit: str = ""
    message: str = ""


Sink = Callable[[Event], None]

_listeners: list[Sink] = []  # the whole process's (a console); a list, so threads that copied no context see them
_subscribed: contextvars.ContextVar[tuple[Sink, ...]] = contextvars.ContextVar("quantflow_sinks", default=())
_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("quantflow_stage", default=None)


def emit(event: Event) -> None:
    for sink in (*_listeners, *_subscribed.get()):
        sink(event)


@contextlib.contextmanager
def listening(sink: Sink) -> Iterator[None]:
    """``sink`` receives every event of this process, from any thread, while the block runs."""
    _listeners.append(sink)
    try:
        yield
    finally:
        _listeners.remove(sink)


@contextlib.contextmanager
def subscribed(sink: Sink) -> Iterator[None]:
    """``sink`` receives the events of this context only (one Prefect task, not the one running beside it)."""
    token = _subscribed.set((*_subscribed.get(), sink))
    try:
        yield
    finally:
        _subscribed.reset(token)


class Stage:
    """A running stage; set ``outcome`` to what the display shows when it ends (e.g. 'perplexity 17.8')."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcome = ""


@contextlib.contextmanager
def stage(name: str) -> Iterator[Stage]:
    """Announce a stage around a block: 'start', then 'done' with its outcome, or 'failed' with the error's first
    line. Events emitted inside the block (``advance``, ``note``, a child process's) carry this stage's name."""
    token = _stage.set(name)
    running = Stage(name)
    emit(Event(name, "start"))
    try:
        yield running
    except BaseException as error:
        emit(Event(name, "failed", message=(str(error).splitlines() or [type(error).__name__])[0]))
        raise
    else:
        emit(Event(name, "done", message=running.outcome))
    finally:
        _stage.reset(token)


def advance(done: int, total: int | None, unit: str) -> None:
    """The current stage has done ``done`` of ``total`` ``unit`` (nothing outside a stage)."""
    name = _stage.get()
    if name is not None:
        emit(Event(name, "advance", done, total, unit))


def note(message: str) -> None:
    """Something the user should read about the current stage (a warning, not a log line)."""
    emit(Event(_stage.get() or "run", "note", message=message))


def current_stage() -> str | None:
    return _stage.get()


class ChildEvents:
    """Carries a child process's events to the parent's subscribers.

    The parent makes one per child (the step context) and passes ``forward_to`` with ``child_args`` as the process
    pool's initializer: the pipe must reach the child when it starts. A thread in the parent forwards every event
    inside the context that started the child, so the events reach that thread's subscribers and Prefect's run
    context. A pipe without a shared lock: a child killed at its timeout cannot leave the parent waiting on one.
    """

    def __init__(self, context: Any) -> None:
        self._reader, self._writer = context.Pipe(duplex=False)
        self.child_args = (self._writer, _stage.get())
        self._context = contextvars.copy_context()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._forward, name="quantflow-child-events", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        while not self._stopped.is_set() or self._reader.poll(0):
            try:
                if self._reader.poll(0.2):
                    self._context.run(emit, self._reader.recv())
            except (EOFError, OSError):  # the child died mid-message: its progress ends there
                return

    def close(self) -> None:
        """Once the child has exited: forward what it sent, then stop."""
        self._stopped.set()
        self._thread.join(timeout=30)
        self._reader.close()
        self._writer.close()


def forward_to(writer: Any, stage_name: str | None) -> None:
    """In the child: send every event to the parent through ``writer``, inside the parent's stage."""
    lock = threading.Lock()  # a step may report from several threads

    def send(event: Event) -> None:
        with lock:
            writer.send(event)

    _listeners.append(send)
    if stage_name is not None:
        _stage.set(stage_name)
