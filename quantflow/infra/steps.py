"""Content-addressed steps that run in a fresh process: the mechanism every heavy stage goes through.

A step's cache key hashes everything its output depends on, so an unchanged step is a lookup
and a changed variant re-runs only its own branch. A computed step runs in a fresh child process,
forked from a server that holds only the imported libraries: that gives every variant a clean
peak-memory reading, proves artifacts reload from disk in a fresh process, frees all memory between
variants, and lets a caller kill a stuck step. Which steps exist and what their keys hash is the pipeline's business
(``quantflow.pipeline.steps``); this module only knows how to run one.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.infra import progress
from quantflow.infra.cache import StepCache

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


class StepRun(BaseModel):
    """What one step call did: found its result in the cache, or computed it. Runs are proven by these, not by
    clocks."""

    step: str
    variant: str
    key: str
    cached: bool
    seconds: float


def _child(root: str, step: str, key: str, work: Callable[..., BaseModel], kwargs: dict[str, Any]) -> BaseModel:
    cache = StepCache(Path(root))
    with cache.writing(step, key) as scratch:
        record = work(out=scratch, final=cache.folder(step, key), **kwargs)
        cache.save(scratch, record)
    return record


def cached(
    cache: StepCache,
    step: str,
    owner: str,
    key: str,
    record: type[R],
    work: Callable[..., R],
    timeout: float | None = None,
    isolate: bool = True,
    **kwargs: Any,
) -> tuple[R, StepRun]:
    """The step's record from the cache, else computed by ``work(out=, final=, **kwargs)``; and what was done.

    ``owner`` names the variant (or the baseline) the step belongs to in its ``StepRun``.

    ``isolate`` (the default) computes in a fresh process (see ``isolated``); tests of in-process
    behaviour turn it off.
    """
    start = time.perf_counter()
    hit = cache.lookup(step, key, record)
    if hit is None and cache.read_only:
        raise QuantflowError(
            f"step '{step}' ({key}) is not in the cache at {cache.root}, though the worker that ran it finished",
            "fanned-out runs need output.cache_dir on storage that every worker and the parent share (one host, or a "
            "shared filesystem)",
        )
    if hit is not None:
        result = hit
    elif isolate:
        result = isolated(step, timeout, _child, str(cache.root), step, key, work, kwargs)
    else:
        result = _child(str(cache.root), step, key, work, kwargs)
    seconds = round(time.perf_counter() - start, 3)
    return result, StepRun(step=step, variant=owner, key=key, cached=hit is not None, seconds=seconds)


# imported once by the fork server, not by every step: each spawned step spent ~10 s of CPU importing these
PRELOAD = ["torch", "transformers", "llmcompressor"]


@functools.cache
def _step_context() -> Any:
    """Steps start from a fork server that has imported the heavy libraries and nothing else: as clean as a spawned
    process (no CUDA context, no threads, no state of the parent), without paying the imports per step."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child_start(environ: dict[str, str], cwd: str, *events: Any) -> None:
    """In the child: the parent's environment and folder as they are now (the fork server kept those of its own
    start: a later run's cache folders, devices or keys would not reach the step), then its progress pipe."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    progress.forward_to(*events)


def isolated(label: str, timeout: float | None, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)`` in a fresh spawned process, killed when it outlives ``timeout``.

    A thread-based timeout (Prefect's) cannot interrupt a blocking CUDA or BLAS call; killing
    the process can. A fresh process also gives the step its own peak memory reading. The
    child's progress events reach this thread's subscribers.
    """
    context = _step_context()
    events = progress.ChildEvents(context)
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=context,
        initializer=_child_start,
        initargs=(dict(os.environ), os.getcwd(), *events.child_args),
    )
    try:
        return pool.submit(work, *args, **kwargs).result(timeout=timeout)
    except FuturesTimeout:
        for process in list(pool._processes.values()):  # the executor has no public kill; its workers are ours
            process.kill()
        raise QuantflowError(
            f"step '{label}' ran longer than its timeout of {timeout:.0f} s and was killed",
            "raise step_timeout_s in the run spec, or give the step a faster device",
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.close()
