"""A task's stage progress in the Prefect UI: a log line when a stage starts and ends, a progress artifact for its
steps (layers quantized, windows evaluated, files uploaded).

The core emits ``quantflow.infra.progress`` events; this subscribes one task to its own events (the calibration
and baseline tasks run side by side), so the task's logs carry a few lines per stage, never the libraries' lines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from quantflow.infra import progress

P = ParamSpec("P")
R = TypeVar("R")
STEP_PCT = 10  # the artifact moves in tenths: a 400-window evaluation makes 11 API calls, not 400


class UiProgress:
    """Turns one task's events into log lines and one progress artifact per stage that has steps."""

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.bars: dict[str, tuple[UUID, int]] = {}

    def __call__(self, event: progress.Event) -> None:
        if event.state == "start":
            self.logger.info("%s: started", event.stage)
        elif event.state == "advance" and event.total:
            self._advance(event)
        elif event.state == "note":
            self.logger.warning("%s: %s", event.stage, event.message)
        elif event.state == "done":
            self.logger.info("%s: done%s", event.stage, f", {event.message}" if event.message else "")

    def _advance(self, event: progress.Event) -> None:
        pct = 100 * event.done // event.total // STEP_PCT * STEP_PCT
        if event.stage not in self.bars:
            artifact = create_progress_artifact(float(pct), description=f"{event.stage}: {event.total} {event.unit}")
            self.bars[event.stage] = (artifact, pct)
        elif pct > self.bars[event.stage][1]:
            update_progress_artifact(self.bars[event.stage][0], float(pct))
            self.bars[event.stage] = (self.bars[event.stage][0], pct)


def shown_in_ui(work: Callable[P, R]) -> Callable[P, R]:
    """Run a task body with its stages reported to the UI (put it under ``@task``)."""

    @functools.wraps(work)
    def reported(*args: P.args, **kwargs: P.kwargs) -> R:
        with progress.subscribed(UiProgress()):
            return work(*args, **kwargs)

    return reported
