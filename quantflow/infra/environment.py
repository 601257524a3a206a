"""What software and hardware produced a number: attached to every report and cache key."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

import quantflow

PACKAGES = (
    "torch",
    "transformers",
    "llmcompressor",
    "compressed-tensors",
    "accelerate",
    "bitsandbytes",
    "safetensors",
    "prefect",
)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, accelerator and host facts; never secrets."""
    cuda = torch.cuda.is_available()
    return {
        "quantflow": quantflow.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_kernels": cpu_kernels(),
        "torch_threads": torch.get_num_threads(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
    }


def first_cpu() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none): the model name and generation."""
    cpuinfo = Path("/proc/cpuinfo")
    block = cpuinfo.read_text().split("\n\n", 1)[0] if cpuinfo.is_file() else ""
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_model() -> str:
    """The CPU's model name: CPU results (GPTQ's and AWQ's rounding above all) follow float sums whose order depends on
    the CPU's kernels and torch's thread count, so a report names both."""
    return first_cpu().get("model name") or platform.processor() or platform.machine()


def cpu_kernels() -> str:
    """Which CPU kernels torch runs here: the CPU generation (family and model; VMs often name only "AMD EPYC") and
    torch's vector capability (AVX2, AVX512, ...) decide the kernels and so the order of GPTQ's and AWQ's float sums.
    Printed digits are comparable between runs only where this string and the thread count match."""
    fields = first_cpu()
    generation = (
        f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else platform.machine()
    )
    return f"{generation}, {torch.backends.cpu.get_cpu_capability()}"


def code_version(*names: str) -> dict:
    """The versions a cached result depends on (part of its content hash)."""
    return {"quantflow": quantflow.__version__, **{name: package_version(name) for name in names}}
