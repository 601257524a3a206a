"""Content-addressed steps that run in a fresh process: the mechanism every heavy stage goes through.

A step's cache key hashes everything its output depends on, so an unchanged step is a lookup
and a changed variant re-runs only its own branch. A computed step runs in a fresh child process,
forked from a server that holds only the imported libraries: that gives every variant a clean
peak-memory reading, proves artifacts reload from disk in a fresh process, frees all memory between
variants, and lets a caller kill a stuck step. A step also stops with the process that asked for it, however that
process ends (``Lifeline``): a killed run must not leave a step computing for minutes. Which steps exist and what
their keys hash is the pipeline's business (``quantflow.pipeline.steps``); this module only knows how to run one.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
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


def _cuda_visible() -> bool:
    """Whether this machine shows a CUDA device (torch counts them through NVML first, without starting CUDA)."""
    import torch

    return torch.cuda.device_count() > 0


@functools.cache
def _step_context() -> Any:
    """Steps start from a fork server that has imported the heavy libraries and nothing else: as clean as a spawned
    process (no threads, no state of the parent), without paying the imports per step.

    Not where a CUDA device is visible: importing llm-compressor there starts CUDA in the fork server, and a process
    forked from it cannot start CUDA again ("Cannot re-initialize CUDA in forked subprocess"; on an H200 a process
    forked after importing torch or transformers could, after llmcompressor it could not): steps spawn there, whose
    imports a GPU machine's cores pay for quickly."""
    if "forkserver" not in multiprocessing.get_all_start_methods() or _cuda_visible():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class Lifeline:
    """A pipe from the process that asks for a step to the step's process: the step stops when it closes.

    Only the requester holds the writing end, so the step reads end-of-file when the requester closes it or
    exits, whatever ended it (SIGKILL included; a forked step's parent is the fork server, so the kernel's
    parent-death signal would not cover the requester). The step then interrupts itself as Ctrl-C would: its
    scratch folder is removed on the way out (``StepCache.writing``) and nothing is published.
    """

    _open: set[Lifeline] = set()  # this process's live lifelines, for stop_steps()
    _lock = threading.Lock()

    def __init__(self, context: Any) -> None:
        self.child_end, self._end = context.Pipe(duplex=False)
        self.was_cut = False
        with self._lock:
            self._open.add(self)

    def cut(self) -> None:
        """The step stops (at once when idle, within ``STOP_GRACE_S`` when computing); idempotent."""
        with self._lock:
            self.was_cut = True
            self._open.discard(self)
            self._end.close()
            self.child_end.close()

    @classmethod
    def cut_all(cls) -> None:
        with cls._lock:
            lifelines = list(cls._open)
        for lifeline in lifelines:
            lifeline.cut()


# how long a step may take to unwind after its requester went away, before it is ended without clean-up
STOP_GRACE_S = 10.0
_working = threading.Lock()  # in a step's process: held while the step computes


def _step(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with _working:
        return work(*args, **kwargs)


def _interrupt_once(signum: int, frame: Any) -> None:
    """Ctrl-C in a step, once: a second interrupt (the terminal's and the lifeline's) would cut its clean-up short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _watch(requester: Any) -> None:
    """In the step's process: wait for the requester's end of the lifeline to close, then stop this process."""
    with contextlib.suppress(EOFError, OSError):
        requester.recv_bytes()  # nothing is ever sent: this returns at end-of-file
    if _working.locked():
        os.kill(os.getpid(), signal.SIGINT)
        _working.acquire(timeout=STOP_GRACE_S)
    os._exit(1)


def _child_start(environ: dict[str, str], cwd: str, requester: Any, *events: Any) -> None:
    """In the child: the parent's environment and folder as they are now (the fork server kept those of its own
    start: a later run's cache folders, devices or keys would not reach the step), the watch on its requester, then
    its progress pipe."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, _interrupt_once)
    threading.Thread(target=_watch, args=(requester,), name="quantflow-lifeline", daemon=True).start()
    progress.forward_to(*events)


def stop_steps() -> None:
    """Stop every step this process has running (each cleans up as on Ctrl-C)."""
    Lifeline.cut_all()


@contextlib.contextmanager
def steps_stop_on_interrupt() -> Iterator[None]:
    """Steps started in other threads stop when an interrupt (Ctrl-C, SIGTERM as Prefect's TerminationSignal,
    SystemExit) leaves the block.

    A Prefect flow waits for its task threads before it records a crash; a task thread waits for its step; without
    this a terminated flow waited for its steps to finish (minutes), and stayed Running on the server meanwhile.
    """
    try:
        yield
    except Exception:
        raise
    except BaseException:
        stop_steps()
        raise


def isolated(label: str, timeout: float | None, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)`` in a fresh spawned process, killed when it outlives ``timeout``.

    A thread-based timeout (Prefect's) cannot interrupt a blocking CUDA or BLAS call; killing
    the process can. A fresh process also gives the step its own peak memory reading. The
    child's progress events reach this thread's subscribers. The child stops when this thread is
    interrupted, when ``stop_steps`` runs, or when this process ends (``Lifeline``).
    """
    context = _step_context()
    events = progress.ChildEvents(context)
    lifeline = Lifeline(context)
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=context,
        initializer=_child_start,
        initargs=(dict(os.environ), os.getcwd(), lifeline.child_end, *events.child_args),
    )
    try:
        return pool.submit(_step, work, *args, **kwargs).result(timeout=timeout)
    except FuturesTimeout:
        _end(pool)
        raise QuantflowError(
            f"step '{label}' ran longer than its timeout of {timeout:.0f} s and was killed",
            "raise step_timeout_s in the run spec, or give the step a faster device",
        ) from None
    except BrokenProcessPool:
        if lifeline.was_cut:  # stop_steps() ended it: the step was stopped, not broken
            raise KeyboardInterrupt(f"step '{label}' stopped") from None
        raise
    except Exception:
        raise
    except BaseException:  # this thread was interrupted (Ctrl-C, SIGTERM): the step stops too, not after its work
        lifeline.cut()
        _end(pool, STOP_GRACE_S + 5)  # in case the step cannot stop itself (a C call that holds the GIL)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        lifeline.cut()
        events.close()


def _end(pool: ProcessPoolExecutor, grace: float = 0) -> None:
    """Kill the pool's process unless it exits within ``grace`` seconds (the executor has no public kill; its workers
    are ours)."""
    for process in list(pool._processes.values()):
        process.join(grace)
        process.kill()
