"""The KV-cache axis on the quantization side: llm-compressor's calibrated KV-cache scheme in a recipe, and the
attention layers that scheme covers.

llm-compressor 0.14 calibrates a KV-cache scheme by hooking each attention module that compressed-tensors 0.19
recognises (a class named '...Attention' with k_proj/v_proj, qkv_proj or kv_b_proj, whose forward takes the cache,
and a module name ending in self_attn or attention). It observes the keys after RoPE and the values, stores one
k_scale and v_scale per layer, and writes the scheme as ``kv_cache_scheme`` in config.json, which is what vLLM
reads. Attention it does not recognise is silently left out, so a run that asks for it is refused here instead.
"""

from __future__ import annotations

import torch

from quantflow.errors import QuantflowError

# the FP8 KV-cache scheme of llm-compressor's examples (examples/quantization_kv_cache): e4m3, one static scale per
# tensor and layer, symmetric, calibrated with min-max
KV_SCHEMES = {"fp8": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}}
KV_LABELS = {"fp8": "FP8 e4m3 KV cache (calibrated per-tensor k/v scales)"}


def twin_name(name: str, option: str) -> str:
    """The name of ``name``'s twin evaluated with the ``option`` KV cache (``gptq`` -> ``gptq-kv-fp8``)."""
    return f"{name}-kv-{option}"


def with_kv_cache(recipe: list, option: str) -> list:
    """The recipe with the KV-cache scheme on its last quantizing modifier (so one pass calibrates the weights and the
    k/v scales, and the artifact carries both), or a modifier of its own when the recipe quantizes no weight."""
    if option == "bf16":
        return recipe
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    scheme = KV_SCHEMES[option]
    quantizers = [index for index, modifier in enumerate(recipe) if isinstance(modifier, QuantizationMixin)]
    if not quantizers:
        return [*recipe, QuantizationModifier(kv_cache_scheme=scheme)]
    last = recipe[quantizers[-1]]
    # rebuilt rather than updated: the modifier decides at construction whether it needs calibration data
    settings = {field: getattr(last, field) for field in last.model_fields_set}
    rebuilt = type(last)(**{**settings, "kv_cache_scheme": scheme})
    return [*recipe[: quantizers[-1]], rebuilt, *recipe[quantizers[-1] + 1 :]]


def covered_attention(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(attention modules the KV-cache scheme calibrates, cached attention modules it would miss)."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module
    from compressed_tensors.quantization.utils.helpers import KV_CACHE_TARGETS
    from compressed_tensors.utils import match_named_modules

    targeted = {name for name, _ in match_named_modules(model, KV_CACHE_TARGETS)}
    cached = [name for name, module in model.named_modules() if is_cached_attention_module(module)]
    return [n for n in cached if n in targeted], [n for n in cached if n not in targeted]


def check_attention(model: torch.nn.Module, option: str, model_type: str) -> None:
    """Refuse a KV-cache scheme the model's attention does not take: no k/v scales would be calibrated, and the
    artifact would claim a quantized cache it does not have."""
    covered, missed = covered_attention(model)
    if not covered or missed:
        found = f"the attention layers {', '.join(missed[:3])} are not" if missed else "no attention layer is"
        raise QuantflowError(
            f"evaluation.kv_cache '{option}' cannot quantize this {model_type} model's KV cache: {found} one "
            "llm-compressor calibrates (an '...Attention' module named self_attn or attention, with k_proj/v_proj, "
            "qkv_proj or kv_b_proj, taking the cache)",
            "set evaluation.kv_cache to [bf16] for this model",
        )
