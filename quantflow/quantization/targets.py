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
    """A mixed variant's quantized Linears grouped for fused kernels, then its embeddings when they are on the menu,
    with each menu option's bits."""
    from quantflow.quantization.mixed import embedding_groups, layer_groups

    embedded, tied = embedding_layers(model, variant)
    quantized, _ = target_layers(model, [*variant.ignore, *embedded])
    widths = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in quantized}
    groups = layer_groups(widths, variant.options, group_size, variant.symmetric)
    if embedded:
        shape = tuple(model.get_submodule(embedded[0]).weight.shape)
        groups += embedding_groups(embedded, shape, tied, variant.embeddings, group_size, variant.symmetric)
    return groups


def input_embedding(model: torch.nn.Module) -> str:
    """The module name of the model's input embedding."""
    found = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is found)


def embedding_layers(model: torch.nn.Module, variant: MixedVariant) -> tuple[list[str], bool]:
    """The input embedding's name and lm_head's when the variant puts them on the menu ([] if not), and whether the two
    share one table.

    compressed-tensors quantizes Embedding and Linear modules only: a model whose input embedding, or the output
    layer sharing its table, is anything else is refused here, at plan time."""
    if not variant.embeddings:
        return [], False
    from quantflow.errors import QuantflowError

    fix = f"remove 'embeddings' from variant '{variant.name}'"
    source, output = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(source, torch.nn.Embedding):
        raise QuantflowError(
            f"variant '{variant.name}' puts the embeddings on the menu, but this model's input embedding is a "
            f"{type(source).__name__}, which compressed-tensors cannot quantize",
            fix,
        )
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tied = output is not None and (output.weight is source.weight or getattr(text, "tie_word_embeddings", False))
    if tied and type(output) is not torch.nn.Linear:
        raise QuantflowError(
            f"variant '{variant.name}' puts the embeddings on the menu, but this model's input embedding is shared "
            f"with an output layer of type {type(output).__name__}, which compressed-tensors cannot quantize",
            fix,
        )
    names = [input_embedding(model)]
    if isinstance(output, torch.nn.Linear):
        names.append(next(name for name, module in model.named_modules() if module is output))
    return names, tied
