"""The KV-cache axis on the quantization side: llm-compressor's calibrated KV-cache scheme in a recipe, and the
attention layers that scheme covers.

llm-compressor 0.14 calibrates a KV-cache scheme by hooking each attention module that compressed-tensors 0.19
recognises (a class named '...Attention' with k_proj/v_proj, qkv_proj or kv_b_proj, whose forward takes the cache,
and a module name ending in self_attn or attention). It observes the keys after RoPE and the values, stores a
k_scale and v_scale per layer (or per KV head and layer), and writes the scheme as ``kv_cache_scheme`` in
config.json, which is what vLLM reads. Attention it does not recognise is silently left out, so a run that asks for
it is refused here instead.
"""

from __future__ import annotations

import torch

from quantflow.errors import QuantflowError

FP8 = {"num_bits": 8, "type": "float", "dynamic": False, "symmetric": True}
# 'fp8': the scheme of llm-compressor's examples (examples/quantization_kv_cache), one static e4m3 scale per tensor
# and layer, from its default observer (a moving average of min-max). 'fp8-head': one scale per KV head and layer
# (compressed-tensors' attn_head strategy), each head's range over the whole calibration set (static min-max): the
# rounding of the largest keys, which costs the most, then follows each head's own range (SmolLM2 at 2,048 tokens:
# +1.94% instead of +2.23%); vLLM reads it on its Flash Attention backend only (docs/evaluation.md).
KV_SCHEMES = {
    "fp8": {**FP8, "strategy": "tensor"},
    "fp8-head": {**FP8, "strategy": "attn_head", "observer": "static_minmax"},
}
# Runtime schemes: the server quantizes K and V as it writes the cache, so the artifact carries no scale and the twin
# keeps its base row's artifact; quantflow emulates the scheme when it evaluates (quantflow/evaluation/kv_cache.py).
# The option is named after vLLM's --kv-cache-dtype value (per token and head, as 'fp8-head' says per head).
RUNTIME_KV = {"int8-token-head": "int8_per_token_head"}
KV_LABELS = {
    "fp8": "FP8 e4m3 KV cache (calibrated per-tensor k/v scales)",
    "fp8-head": "FP8 e4m3 KV cache (calibrated per-head k/v scales; vLLM: Flash Attention backend only)",
    "int8-token-head": "int8 KV cache, one dynamic scale per token and KV head: vLLM's runtime scheme, served with "
    f"--kv-cache-dtype {RUNTIME_KV['int8-token-head']} on its Triton attention backend; emulated by quantflow, no KV "
    "scales in the artifact",
}


def twin_name(name: str, option: str) -> str:
    """The name of ``name``'s twin evaluated with the ``option`` KV cache (``gptq`` -> ``gptq-kv-fp8``)."""
    return f"{name}-kv-{option}"


def with_kv_cache(recipe: list, option: str) -> list:
    """The recipe with the KV-cache scheme on its last quantizing modifier (so one pass calibrates the weights and the
    k/v scales, and the artifact carries both), or a modifier of its own when the recipe quantizes no weight. A bf16
    or runtime cache (RUNTIME_KV) leaves the recipe as it is."""
    if option not in KV_SCHEMES:
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
    artifact would claim a quantized cache it does not have. A runtime scheme's emulation hooks the same attention
    modules (compressed-tensors' cache hook), and quantizes per KV head, so it takes the per-head rule too."""
    covered, missed = covered_attention(model)
    per_head = option in RUNTIME_KV or KV_SCHEMES[option]["strategy"] == "attn_head"
    if covered and not missed and per_head:
        check_heads(model, covered, option, model_type)
    if not covered or missed:
        found = f"the attention layers {', '.join(missed[:3])} are not" if missed else "no attention layer is"
        raise QuantflowError(
            f"evaluation.kv_cache '{option}' cannot quantize this {model_type} model's KV cache: {found} one "
            "llm-compressor calibrates (an '...Attention' module named self_attn or attention, with k_proj/v_proj, "
            "qkv_proj or kv_b_proj, taking the cache)",
            "set evaluation.kv_cache to [bf16] for this model",
        )


def check_heads(model: torch.nn.Module, covered: list[str], option: str, model_type: str) -> None:
    """Refuse per-head scales where the cache has no KV heads of the config's count: multi-head latent attention
    (kv_b_proj) caches one latent vector per token, and compressed-tensors sizes the scales from
    ``num_key_value_heads``, which must then be one number for every layer."""
    text = model.config.get_text_config()
    latent = [name for name in covered if hasattr(model.get_submodule(name), "kv_b_proj")]
    if latent or not isinstance(getattr(text, "num_key_value_heads", None), int):
        found = (
            f"the attention layers {', '.join(latent[:3])} cache a latent vector, not KV heads"
            if latent
            else "its config gives no single num_key_value_heads"
        )
        raise QuantflowError(
            f"evaluation.kv_cache '{option}' needs one scale per KV head, and this {model_type} model has none: "
            f"{found}",
            "use evaluation.kv_cache 'fp8' (per-tensor scales) for this model",
        )
