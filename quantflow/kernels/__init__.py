"""The kernels quantflow's runtimes run, behind one call: ``linear(x, packed)``.

Each kernel module names its weight layout at the top and keeps a reference beside it:

- ``w4_pack``: the 4-bit weight layout, its repack from compressed-tensors and the dequantized reference;
- ``w4a16``: Triton kernels on it (decode for 1-32 rows, unpack to bf16 for prefill);
- ``fp8``: the FP8 W8A8 Linears (``_scaled_mm``), with ``fp8_gemv`` and ``fp8_mlp`` for one row and ``e4m3``;
- ``int8``: the INT8 W8A8 and W8A16 Linears on PyTorch's int8 kernels.
- ``fp4``: compressed-tensors' NVFP4/MXFP4 weights as saved, their dequantization and a Triton decode product
  for 1-16 rows (``fp4_decode``) with ``FP4Linear``, the FP4 runtime's module; not yet timed on a GPU.

The FP8 and INT8 Linears are modules the runtimes swap in; the W4 kernels go through ``linear``.

``linear`` picks the kernel by row count and falls back to the dequantized reference where no kernel can run (a
layout the kernels cannot take, no GPU, no Triton): never a wrong number, and ``route`` says which ran and why.
Nothing here imports Triton until a kernel runs, so CPU-only installs use the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from quantflow.kernels.w4_pack import W4Weight, reference_linear

DECODE_ROWS = 32  # up to here the W4 decode kernel; above, unpack to bf16 + cuBLAS
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it once too, at import
_checked: dict[str, int | str] = {}  # device -> unpack form that passed the self-check, or why none did
_problems: dict[str, str | None] = {}  # device -> why the kernels cannot run there (filled eagerly: pack, first call)


def kernel_problem(x: torch.Tensor, packed: W4Weight) -> str | None:
    """Why ``x`` times ``packed`` cannot run on a kernel, or None when it can."""
    return packed.reason or device_problem(x.device)


def device_problem(device: torch.device) -> str | None:
    """Why the W4 kernels cannot run on ``device``, or None when they can (their self-check passed there). Cached per
    device, so a compiled graph reads a constant."""
    return checked_once(_problems, device, _device_problem)


def _device_problem(device: torch.device) -> str | None:
    problem = triton_problem(device, "W4 kernels")
    if problem is not None or _INTERPRETED:
        return problem
    form = unpack_form(device)
    return form if isinstance(form, str) else None


def checked_once(cache: dict[str, str | None], device: torch.device, check) -> str | None:
    """``check(device)``, run once per device ("cuda" and "cuda:0" are one) and remembered in ``cache``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in cache:
        cache[key] = check(device)
    return cache[key]


def triton_problem(device: torch.device, kernels: str) -> str | None:
    """Why quantflow's Triton ``kernels`` cannot run on ``device`` whatever their self-check says, or None: Triton
    missing, not a CUDA GPU (Triton's CPU interpreter runs them anywhere), no bf16 tensor cores."""
    if not _HAS_TRITON:
        return "Triton is not installed"
    if _INTERPRETED:
        return None
    if device.type != "cuda":
        return f"the {kernels} run on CUDA GPUs"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"
    return None


def unpack_form(device: torch.device) -> int | str:
    """The fastest unpack that gives the plain unpack's numbers on this device (checked once), or why none does."""
    from quantflow.kernels import w4a16

    if _INTERPRETED or device.type != "cuda":
        return w4a16.PLAIN
    key = str(device)
    if key not in _checked:
        _checked[key] = w4a16.self_check(device)
    return _checked[key]


def route(rows: int, x: torch.Tensor, packed: W4Weight) -> str:
    """Which kernel ``linear`` runs for ``rows`` rows of ``x``'s kind: the label the report shows."""
    problem = kernel_problem(x, packed)
    if problem is not None:
        return f"reference, no kernel ({problem})"
    if rows > DECODE_ROWS:
        return "W4A16 unpack to bf16 + cuBLAS"
    return f"W4A16 Triton decode ({unpack_name(x.device)} unpack)"


def kernels_label(device: torch.device) -> str:
    """The W4A16 kernels as a report names them: which unpack the decode kernel runs here (the plain one, where the
    inline PTX failed its check, is much slower) and the prefill path."""
    problem = device_problem(device)
    if problem is not None:
        return f"W4A16 dequantized reference, no kernel ({problem})"
    return f"W4A16 Triton kernels (tensor-core decode to 32 rows with the {unpack_name(device)} unpack, bf16 + cuBLAS above)"


def unpack_name(device: torch.device) -> str:
    """'lop3' or 'plain': the decode kernel's unpack on ``device`` (one whose kernels run there)."""
    from quantflow.kernels.w4a16 import FORMS

    return FORMS[unpack_form(device)]


def linear(x: torch.Tensor, packed: W4Weight) -> torch.Tensor:
    """``x @ w.T`` in bf16 for activations ``x`` [..., K] and a packed weight, on the kernel ``route`` names."""
    if kernel_problem(x, packed) is not None:
        return reference_linear(x, packed)
    from quantflow.kernels import w4a16  # noqa: F401 (registers the custom ops)

    form = unpack_form(x.device)
    flat = x.reshape(-1, packed.in_features).to(torch.bfloat16).contiguous()
    args = (packed.words, packed.scale, packed.offset)
    if flat.shape[0] <= DECODE_ROWS:
        y = torch.ops.quantflow.w4a16_decode(flat, *args, packed.count, packed.out_features, packed.group_size, form)
    else:
        w = torch.ops.quantflow.w4a16_dequantize(*args, packed.out_features, packed.group_size)
        y = flat @ w.t()
    return y.reshape(*x.shape[:-1], packed.out_features)
