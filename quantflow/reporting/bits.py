"""Effective bits per weight: what a quantized Linear really stores per weight, scales and zero points included.

"W4 g128" is not 4 bits: a bf16 scale per 128 weights adds 0.125, an asymmetric zero point more,
and bitsandbytes keeps fp32 block maxima. Sizes on disk mix in what was never quantized
(embeddings, norms, lm_head), so the report states bits per weight over the quantized Linears
alone, read from the artifact's safetensors headers (only the tiny ``weight_shape`` tensors are
loaded). Unquantized models count their Linear weights' dtype (16 for bf16), and so do the Linears an artifact
left dense (a mixed variant's bf16 layers, or layers named in ``ignore`` other than lm_head).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "BF16": 16,
    "F16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "BOOL": 8,
}
QUANT_PARTS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
FP4_PER_BYTE = 2  # NVFP4 and MXFP4 pack two E2M1 weights per uint8 and store no weight_shape
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size in transformers' default config
BNB_DOUBLE_BLOCK = 256  # blocks whose fp32 maxima double quantization stores as 8 bits, with one fp32 per group


def tensors(folder: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, list[int]]]:
    """Every tensor of a model folder as name -> (safetensors dtype, shape), from the headers, in one pass over
    the shards; and each packed layer's unpacked [out, in] from its tiny ``weight_shape`` tensor."""
    from safetensors import safe_open

    found, unpacked = {}, {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                found[name] = (part.get_dtype(), list(part.get_shape()))
                if name.endswith(".weight_shape"):
                    unpacked[name.removesuffix(".weight_shape")] = [int(v) for v in handle.get_tensor(name).tolist()]
    return found, unpacked


def dense_linears(found: dict[str, tuple[str, list[int]]]) -> dict[str, tuple[str, list[int]]]:
    """2-D weights of the decoder's Linears (embeddings and lm_head are never quantized by quantflow)."""
    return {
        name: spec
        for name, spec in found.items()
        if name.endswith(".weight") and len(spec[1]) == 2 and "embed" not in name and "lm_head" not in name
    }


def unpacked_shape(parts: dict[str, tuple[str, list[int]]]) -> list[int]:
    """A quantized layer's [out, in] without a ``weight_shape``: its FP8 weight's, or its uint8-packed FP4's."""
    if "weight" in parts:
        return parts["weight"][1]
    out, packed = parts["weight_packed"][1]
    return [out, packed * FP4_PER_BYTE]


def artifact_bits(folder: Path) -> float | None:
    """Bits per weight over the quantized Linears of a compressed-tensors folder; the dtype's bits for a dense one."""
    found, unpacked = tensors(folder)
    quantized = sorted({name.rsplit(".", 1)[0] for name in found if name.endswith(".weight_scale")})
    if not quantized:
        linears = dense_linears(found)
        weights = sum(math.prod(shape) for _, shape in linears.values())
        return (
            round(sum(math.prod(shape) * DTYPE_BITS[dtype] for dtype, shape in linears.values()) / weights, 3)
            if weights
            else None
        )
    stored = weights = 0
    kept = {n: spec for n, spec in dense_linears(found).items() if n.removesuffix(".weight") not in quantized}
    for dtype, shape in kept.values():  # Linears left dense (a mixed variant's bf16 layers) count at their dtype
        stored += math.prod(shape) * DTYPE_BITS[dtype]
        weights += math.prod(shape)
    for layer in quantized:
        parts = {part: found[f"{layer}.{part}"] for part in QUANT_PARTS if f"{layer}.{part}" in found}
        stored += sum(math.prod(shape) * DTYPE_BITS[dtype] for dtype, shape in parts.values())
        weights += math.prod(unpacked[layer] if layer in unpacked else unpacked_shape(parts))
    return round(stored / weights, 3)


def bnb_bits(method: str, double_quant: bool, baseline: Path) -> float:
    """bitsandbytes' bits per weight over the decoder's Linears, from its storage layout.

    4-bit: 4 bits plus an fp32 absmax per 64-weight block, or with double quantization an 8-bit absmax
    and one fp32 per 256 blocks. int8 (LLM.int8): 8 bits plus one fp32 scale per output row. bitsandbytes replaces
    ``nn.Linear`` modules only: a mixture's experts (fused 3-D tensors in transformers 5) and routers stay in bf16
    and count at 16 bits, so on an MoE, where the experts hold most weights, the figure is near bf16's.
    """
    shapes = {name: shape for name, (_, shape) in dense_linears(tensors(baseline)[0]).items()}
    kept = sum(math.prod(shape) for name, shape in shapes.items() if bnb_leaves_dense(name.removesuffix(".weight")))
    quantized = [shape for name, shape in shapes.items() if not bnb_leaves_dense(name.removesuffix(".weight"))]
    weights = sum(math.prod(shape) for shape in quantized)
    if method in ("bnb-nf4", "bnb-fp4"):
        per_weight = 4 + (8 / BNB_BLOCK + 32 / (BNB_BLOCK * BNB_DOUBLE_BLOCK) if double_quant else 32 / BNB_BLOCK)
    else:
        per_weight = (8 * weights + 32 * sum(shape[0] for shape in quantized)) / weights
    return round((per_weight * weights + 16 * kept) / (weights + kept) if kept else per_weight, 3)


def bnb_leaves_dense(layer: str) -> bool:
    """A stored 2-D weight that bitsandbytes does not quantize: an expert's projection or a router."""
    from quantflow.quantization.moe import ROUTER_PATTERNS, expert_of

    return expert_of(layer) is not None or any(re.match(p.removeprefix("re:"), layer) for p in ROUTER_PATTERNS)
