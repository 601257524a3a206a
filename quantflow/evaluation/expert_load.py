"""The one workaround for loading asymmetric mixture-of-experts artifacts in transformers.

transformers 5.17 dequantizes a compressed-tensors checkpoint's per-expert weights while it fuses them into its
3-D expert tensors (``DecompressExperts``), but it collects only ``weight_packed``, ``weight_scale`` and
``weight_shape``: an asymmetric scheme's ``weight_zero_point`` (AWQ's default) never reaches the decompressor,
and compressed-tensors stops the load with "Asymmetric quant requires zero-point values". The artifact itself
is right (per-expert Linears with zero points, the layout vLLM loads).

Upstream fix: huggingface/transformers#47430 "fix(compressed_tensors): collect zero_point for asymmetric MoE
expert decompression" (open when this was written). ``tests/unit/test_moe.py::test_upstream_still_drops_expert_
zero_points`` loads such an artifact without this module and expects the failure: when it passes no more, the fix
has landed and this module can go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

ZERO_POINT = "_zero_point$"


def _collect_zero_points(converter):
    """The experts' converter with the zero points among its sources (unchanged when it has them already)."""
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.compressed_tensors import DecompressExperts

    if not isinstance(converter, WeightConverter) or not any(
        isinstance(op, DecompressExperts) for op in converter.operations
    ):
        return converter
    sources = list(converter._original_source_patterns)
    packed = [p for p in sources if p.endswith("_packed$")]
    if not packed or any(p.endswith(ZERO_POINT) for p in sources):
        return converter
    return WeightConverter(
        source_patterns=[*sources, *(p.removesuffix("_packed$") + ZERO_POINT for p in packed)],
        target_patterns=list(converter._original_target_patterns),
        operations=list(converter.operations),
    )


class _Packed(nn.Module):
    """One expert projection's stored tensors, as compressed-tensors' decompressor reads them from a module."""

    def __init__(self, tensors: dict[str, torch.Tensor], scheme) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.quantization_scheme = scheme


def _decompress_with_zero_points(original):
    """``DecompressExperts.convert`` that hands each expert's zero point to the decompressor."""

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
        if not any("weight_zero_point" in key for key in input_dict):
            return original(self, input_dict, source_patterns, target_patterns, full_layer_name, **kwargs)
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from transformers.integrations.compressed_tensors import get_experts_scheme

        scheme = self.scheme or get_experts_scheme(self.hf_quantizer.compressor.quantization_config)
        compressor = BaseCompressor.get_value_from_registry(scheme.format or infer_module_format(nn.Linear, scheme))
        out = {}
        for key in (k for k in input_dict if "weight_packed" in k):
            parts = {
                f"weight_{part}": input_dict[key.replace("weight_packed", f"weight_{part}")]
                for part in ("packed", "scale", "shape", "zero_point")
            }
            experts = []
            for index in range(len(parts["weight_packed"])):
                module = _Packed({name: values[index] for name, values in parts.items()}, scheme)
                compressor.decompress_module(module)
                experts.append(module.weight.data)
            out[key] = torch.stack(experts)
        return out

    return convert


@contextlib.contextmanager
def asymmetric_expert_load() -> Iterator[None]:
    """Within this context transformers loads asymmetric compressed-tensors experts with their zero points."""
    from transformers.integrations.compressed_tensors import DecompressExperts
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    update, convert = CompressedTensorsHfQuantizer.update_weight_conversions, DecompressExperts.convert

    def collecting(self, weight_conversions):
        return [_collect_zero_points(c) for c in update(self, weight_conversions)]

    CompressedTensorsHfQuantizer.update_weight_conversions = collecting
    DecompressExperts.convert = _decompress_with_zero_points(convert)
    try:
        yield
    finally:
        CompressedTensorsHfQuantizer.update_weight_conversions, DecompressExperts.convert = update, convert
