"""Errors meant for people: every one says what went wrong and how to fix it."""

from __future__ import annotations


class QuantflowError(Exception):
    """A failure caused by input or environment, with the fix spelled out.

    The CLI prints ``str(error)`` without a traceback and exits non-zero, so the
    message must stand alone: what is wrong, where, and what to do about it.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}")

    def __reduce__(self):  # steps run in child processes: the error must cross back intact
        return type(self), (self.problem, self.fix)


class TransientError(QuantflowError):
    """A failure a retry may cure (a store that did not answer, a dropped connection); bad input never is one."""
