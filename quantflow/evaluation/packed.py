"""Load a compressed-tensors artifact with its quantized Linears replaced by kernel-backed modules.

transformers would decompress every quantized weight to dense bf16 at load, which measures the
baseline's speed and size again. The int4 and FP8 runtimes instead build the model's module tree
without weights, turn each quantized Linear's stored tensors into their own module, and load the
rest (embeddings, norms, lm_head) in bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantflow.errors import QuantflowError

Convert = Callable[[dict[str, torch.Tensor], torch.Tensor | None, torch.device], nn.Module]


def load_converted(path: str | Path, device: str, marker: str, parts: tuple[str, ...], convert: Convert) -> nn.Module:
    """The artifact at ``path`` with every layer that stores ``<layer>.<marker>`` built by ``convert`` from its
    ``parts`` (and bias); everything else loads in bf16."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantflow.evaluation.expert_load import module_names
    from quantflow.quantization.moe import unfuse_weightless  # a mixture's experts: one kernel module per expert

    path, target = Path(path), torch.device(device)
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers such as rotary tables stay real
        model = unfuse_weightless(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=str(target)) as handle:  # unpacked where it will run
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    tensors = module_names(tensors, config.model_type)  # a family's own checkpoint names (Mixtral's w1/w2/w3)
    for prefix in sorted(key.removesuffix(f".{marker}") for key in tensors if key.endswith(f".{marker}")):
        found = {suffix: tensors.pop(f"{prefix}.{suffix}") for suffix in parts if f"{prefix}.{suffix}" in tensors}
        if isinstance(model.get_submodule(prefix), nn.Embedding):
            raise QuantflowError(
                f"{path} stores a quantized embedding ({prefix}), which this runtime's kernels do not run",
                "evaluate the artifact with transformers (without the packed runtime)",
            )
        parent_name, _, child = prefix.rpartition(".")
        model.get_submodule(parent_name).register_module(
            child, convert(found, tensors.pop(f"{prefix}.bias", None), target)
        )
    model.load_state_dict({key: value.to(torch.bfloat16) for key, value in tensors.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise QuantflowError(f"{path} lacks weights for {missing[:3]}", "use a complete artifact folder")
    return model.to(target).eval()
