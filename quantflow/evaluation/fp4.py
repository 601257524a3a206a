"""Execute compressed-tensors FP4 weight-only artifacts (NVFP4 and MXFP4 W4A16) from their packed weights.

transformers would dequantize every FP4 weight to bf16 at load: the quality is the FP4 model's, the speed and memory
are the baseline's. Here each quantized Linear keeps its FP4 codes and group scales as saved and runs on
``quantflow.kernels.fp4``'s ``FP4Linear`` (the Triton decode kernel to 16 rows, the weight dequantized to bf16 by a
Triton kernel for cuBLAS above). No Hopper or CPU has FP4 matmuls, so W4A4 artifacts are not run here at all. The
kernels are not yet timed on a GPU, so only ``evaluation.kernels: fp4`` chooses them; 'auto' keeps these dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantflow.errors import QuantflowError
from quantflow.evaluation.evaluate import is_fp4
from quantflow.kernels.fp4 import FP4Linear, device_problem, from_compressed

DENSE = "use the dense runtime (evaluation.kernels: auto or dense)"
LABEL = "FP4 weights on quantflow's Triton kernels (decode to 16 rows; above, dequantized to bf16 + cuBLAS)"


def fp4_activations(path: Path) -> bool:
    """An FP4 artifact with FP4 activations (W4A4): no machine here has the matmul, so it is not timed."""
    if not is_fp4(path):
        return False
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    return any(group.get("input_activations") for group in quant.get("config_groups", {}).values())


def fp4_weight_only(path: str | Path) -> bool:
    return is_fp4(Path(path)) and not fp4_activations(Path(path))


def fp4_kernel_missing(device: str) -> str | None:
    """Why this machine cannot run the FP4 decode kernel, or None when it can."""
    if device != "cuda" or not torch.cuda.is_available():
        return "the run is on CPU; quantflow runs the FP4 kernel on CUDA GPUs only"
    return device_problem(torch.device("cuda"))


def use_fp4(path: str | Path, kernels: str, device: str) -> bool:
    """FP4 weight-only artifacts run on the FP4 kernel when asked for by name (the plan refuses machines without it)."""
    return kernels == "fp4" and fp4_weight_only(path)


def load_fp4(path: str | Path, device: str) -> nn.Module:
    """Load an FP4 W4A16 artifact with its quantized Linears as ``FP4Linear`` and everything else in bf16."""
    from quantflow.evaluation.packed import load_converted

    path = Path(path)
    if not fp4_weight_only(path):
        raise QuantflowError(f"{path} is not an FP4 weight-only artifact", "use the dense runtime for this model")
    fmt = json.loads((path / "config.json").read_text())["quantization_config"]["format"]

    def convert(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, target: torch.device) -> FP4Linear:
        if "weight_zero_point" in parts:
            raise QuantflowError(f"{path} stores FP4 zero points, which the FP4 kernels do not apply", DENSE)
        try:
            weight = from_compressed(
                parts["weight_packed"], parts["weight_scale"], parts.get("weight_global_scale"), fmt
            )
        except ValueError as error:
            raise QuantflowError(f"{path}: {error}", DENSE) from None
        return FP4Linear(weight, bias)

    parts = ("weight_packed", "weight_scale", "weight_global_scale", "weight_zero_point")
    model = load_converted(path, device, "weight_packed", parts, convert)
    device_problem(torch.device(device))  # the kernels' check now, not inside the first (compiled) forward
    untiled = [n for n, m in model.named_modules() if isinstance(m, FP4Linear) and m.block_k is None]
    if untiled:
        raise QuantflowError(
            f"the FP4 kernel needs layer widths that are multiples of 32; {len(untiled)} layers are not "
            f"(e.g. {untiled[0]})",
            DENSE,
        )
    return model
