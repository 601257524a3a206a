"""Devices and peak memory: one place that knows how to ask CUDA or the OS."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel

from quantflow.errors import QuantflowError


class Resources(BaseModel):
    """What a heavy step may use: one small record instead of four loose arguments on every step."""

    device: str
    dtype: str = "bfloat16"
    gpu_memory_gb: float | None = None
    timeout_s: float | None = None
    compile_cache: str | None = None  # Inductor's caches (FX graphs, autotuning): shared by every step that compiles
    calibration_batch: int = 1  # calibration samples per forward pass while quantizing (equal lengths only)

    def use_compile_cache(self) -> None:
        """Point Inductor (and Triton under it) at the shared compile cache, in this fresh step process.

        Every variant's evaluation runs in a process of its own; with the cache in one place, the
        second and later variants of a shape reuse the first one's compiled and autotuned kernels.
        A user's own TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR wins; torch's machine-wide default does
        not: torch writes that default into os.environ the first time anything asks for its folder
        (importing torch._dynamo does), so the variable being set says nothing about who set it.
        """
        if not self.compile_cache:
            return
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = Path(default_cache_dir()).resolve()
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current and Path(current).resolve() != torch_default:
            return
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.compile_cache
        triton = os.environ.get("TRITON_CACHE_DIR")
        if triton and Path(triton).resolve().is_relative_to(torch_default):
            del os.environ["TRITON_CACHE_DIR"]  # torch's own, under its default: let it follow Inductor's folder

    @property
    def compute_dtype(self) -> str:
        return compute_dtype(self.device, self.dtype)


def pick_device(requested: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'; 'cuda' without one is an error."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise QuantflowError(
            "device 'cuda' was requested but no CUDA device is visible",
            "set device: auto or cpu, or run on a GPU machine",
        )
    return "cuda" if requested == "auto" and has_cuda else ("cpu" if requested == "auto" else requested)


def visible_devices() -> str | None:
    """This process's CUDA_VISIBLE_DEVICES (None: unset, every card visible).

    Recorded with every measured step: on a host with several GPU workers it shows which card
    quantized or timed a variant, the check that each worker's card assignment reached its run.
    """
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def compute_dtype(device: str, dtype: str) -> str:
    """The dtype forward passes run in: ``dtype`` on an accelerator, float32 on CPU.

    CPUs without bf16 matrix units run bf16 matmuls an order of magnitude slower than float32.
    """
    return "float32" if device == "cpu" else dtype


def _gpus() -> range:
    """Visible GPUs, once CUDA is initialized (before that nothing was allocated, and the stats calls fail)."""
    return range(torch.cuda.device_count() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0)


def reset_peak_memory() -> None:
    for index in _gpus():
        torch.cuda.reset_peak_memory_stats(index)


def peak_memory_mb() -> tuple[float, str]:
    """Peak accelerator memory when CUDA is in use, else this process's peak RSS.

    Peak RSS is process-wide, which is why quantflow runs every heavy step in a fresh
    process: the number then belongs to that step alone.
    """
    peak = sum(torch.cuda.max_memory_allocated(index) for index in _gpus())  # summed when layers span several GPUs
    if peak > 0:
        return round(peak / 2**20, 1), "cuda_max_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1), "peak_rss"


WEIGHT_SHARE = 0.8  # of a GPU memory budget, for weights placed at load; the rest is left for activations and KV cache


def cap_gpu_memory(gb: float | None) -> None:
    """Hold this process to ``gb`` GiB on every visible GPU (the spec's ``gpu_memory_gb``).

    PyTorch's caching allocator then refuses to grow past the cap, so a step that needs more
    fails here, with ``over_budget``'s message, instead of crowding out another job on a shared card.
    """
    if gb is None or not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total), index)


def check_fits(weight_bytes: int, gpu_memory_gb: float | None, gpus: int, host_free: int) -> None:
    """Refuse, before any work, a model whose weights exceed the GPU budget and the free host memory together.

    Under a budget, evaluation places the weights' share of it on every GPU and offloads the rest
    to host memory (``placement_budget``); when even that cannot hold them, the run would fail an
    hour in, at load.
    """
    if gpu_memory_gb is None or not gpus:
        return
    room = int(gpu_memory_gb * WEIGHT_SHARE * 2**30) * gpus + host_free
    if weight_bytes > room:
        raise QuantflowError(
            f"the model's weights ({weight_bytes / 2**30:.1f} GiB) do not fit gpu_memory_gb {gpu_memory_gb:g} GiB x "
            f"{gpus} GPU(s) ({WEIGHT_SHARE:.0%} of it for weights) plus {host_free / 2**30:.1f} GiB of free host "
            "memory",
            "raise gpu_memory_gb, run on a worker with more GPUs or host memory, or pick a smaller model",
        )


def placement_budget(gb: float | None) -> dict[int | str, int] | None:
    """``max_memory`` for ``from_pretrained(device_map="auto")``: each GPU's weight share of the budget, the rest in
    host RAM."""
    if gb is None:
        return None
    import psutil

    budget: dict[int | str, int] = {index: int(gb * WEIGHT_SHARE * 2**30) for index in range(torch.cuda.device_count())}
    budget["cpu"] = psutil.virtual_memory().available
    return budget


@contextlib.contextmanager
def over_budget(step: str, gb: float | None) -> Iterator[None]:
    """Turn a CUDA out-of-memory error under a configured budget into the fix."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        limit = f"the configured gpu_memory_gb of {gb:g} GiB" if gb else "the GPU's memory"
        raise QuantflowError(
            f"step '{step}' needed more than {limit} ({str(error).splitlines()[0]})",
            "raise gpu_memory_gb, or lower calibration.num_samples / calibration.seq_len (quantization) or "
            "evaluation.window and the speed batch sizes (evaluation)",
        ) from None
