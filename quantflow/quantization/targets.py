"""Which Linears a variant quantizes, and a mixed variant's layer groups: shared by the quantize and sensitivity steps.

Kept apart from ``quantflow.quantization.quantize`` so that the sensitivity step, which quantize reads, need not
import it back (an import circle).
"""

from __future__ import annotations

import torch

from quantflow.quantization.mixed import LayerGroup
from quantflow.spec import MixedVariant


def target_layers(model: torch.nn.Module, ignore: list[str]) -> tuple[list[str], list[str]]:
    """(quantized, skipped) Linear layer names under llm-compressor's own matching rules."""
    from compressed_tensors.utils import match_named_modules

    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted = {name for name, _ in match_named_modules(model, ["Linear"], ignore)}
    return [n for n in linear if n in targeted], [n for n in linear if n not in targeted]


def mixed_groups(model: torch.nn.Module, variant: MixedVariant, group_size: int | None) -> list[LayerGroup]:
    """A mixed variant's quantized Linears grouped for fused kernels, with each menu option's bits."""
    from quantflow.quantization.mixed import layer_groups

    quantized, _ = target_layers(model, variant.ignore)
    widths = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in quantized}
    return layer_groups(widths, variant.options, group_size, variant.symmetric)
