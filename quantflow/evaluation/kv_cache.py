"""The KV cache as evaluated: which precision a loaded model's cache runs in, its bytes per token, and how many
tokens of it fit on a card beside the weights.

A checkpoint whose config.json carries a ``kv_cache_scheme`` loads through compressed-tensors, which hooks every
covered attention module: the keys (after RoPE) and values are quantized with the stored k/v scales (per tensor, or
per KV head) and dequantized before attention reads them, as vLLM's FP8 cache stores and reads them. So the
perplexity of such a model is the quantized cache's, exactly emulated, on any device.

A runtime scheme (``int8-token-head``, vLLM's ``--kv-cache-dtype int8_per_token_head``) has no scales to store: the
server quantizes each token's K and V per KV head as it writes them. ``emulate_runtime_kv`` hooks the same place
compressed-tensors does (the cache update, keys after RoPE), so each token is quantized once, as it enters the cache.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

KV_FORMATS = {("float", 8): "fp8", ("int", 8): "int8"}
GIB = 2**30
EMULATED = "quantflow_kv_cache"  # the model attribute naming the runtime KV scheme emulated on it
# vLLM's int8_per_token_head (its Triton kernel _reshape_cache_per_token_head): a float32 scale per token and KV head,
# absmax / 127 (at least 1e-6); the values times 1 / scale, clamped to [-128, 127] and stored as int8, which in Triton
# truncates toward zero (vLLM's tests/quantization/test_per_token_kv_cache.py says so). The scales take 4 bytes per
# token and KV head for K and for V beside the cache.
INT8_MAX, INT8_MIN, SCALE_BYTES = 127.0, -128.0, 4


class KVCacheRecord(BaseModel):
    """The KV cache of one evaluated model."""

    precision: str  # 'bf16' for the model's own dtype, else the scheme's format ('fp8')
    bytes_per_token: int | None  # layers x KV heads x head dim x 2 (K and V) x bytes per element
    long_window: int | None = None  # tokens per window of the long-context perplexity (None: not measured)
    long_perplexity: float | None = None
    long_scored_tokens: int = 0


def quantize_per_token_head(states: torch.Tensor) -> torch.Tensor:
    """K or V states (batch, KV heads, tokens, head dim) through vLLM's int8 per-token-head cache and back: the
    kernel's arithmetic, truncation included (up to one step of error, toward zero, where rounding would give half)."""
    scale = (states.float().abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=1e-6)
    return ((states.float() * (1.0 / scale)).clamp(INT8_MIN, INT8_MAX).trunc() * scale).to(states.dtype)


def emulate_runtime_kv(model: torch.nn.Module, option: str) -> None:
    """Quantize every covered attention module's K and V as they enter the cache (perplexity, KL, long context and
    generation alike). The plan refused a model with attention this misses (check_attention)."""
    from compressed_tensors.modeling.kvcache import initialize_hooked_kv_cache, register_key_hook, register_value_hook

    from quantflow.quantization.kv_cache import covered_attention

    def quantized(_module, states: torch.Tensor) -> torch.Tensor:
        return quantize_per_token_head(states)

    for name in covered_attention(model)[0]:
        module = model.get_submodule(name)
        initialize_hooked_kv_cache(model, module)
        register_key_hook(module, quantized)
        register_value_hook(module, quantized)
    setattr(model, EMULATED, option)


def kv_precision(model: torch.nn.Module) -> str:
    """'bf16', the runtime scheme emulated on the model, or the format of the KV-cache scheme compressed-tensors
    installed on the model's attention, with '-head' when its scales are per KV head (the option's name: 'fp8',
    'fp8-head', 'int8-token-head')."""
    if hasattr(model, EMULATED):
        return getattr(model, EMULATED)
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "input_activations", None)
        if args is not None and hasattr(module, "k_scale"):
            kind = KV_FORMATS.get((str(getattr(args.type, "value", args.type)), args.num_bits), f"{args.num_bits}-bit")
            return kind + ("-head" if str(getattr(args.strategy, "value", args.strategy)) == "attn_head" else "")
    return "bf16"


def bytes_per_token(config, precision: str) -> int | None:
    """KV-cache bytes one token costs over all layers: the config's layers, KV heads and head dim; 2 bytes per
    element in bf16, 1 in an 8-bit cache (a calibrated cache's scales are a few bytes per layer or head, not per
    token), plus a float32 scale per token and KV head for K and for V in 'int8-token-head'. None for a config that
    does not name them the standard way (no guess)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if precision == "int8-token-head":
        return layers * kv_heads * (head_dim + SCALE_BYTES) * 2
    return layers * kv_heads * head_dim * 2 * (2 if precision == "bf16" else 1)


class Capacity(BaseModel):
    """What fits on a card of ``card_memory_gb`` GiB beside the weights: an upper bound, weights plus KV cache only
    (no activations, no runtime reserve)."""

    card_memory_gb: float
    max_kv_tokens: int  # batch x context, summed over the batch
    context: int | None = None
    max_batch: int | None = None  # at ``context`` tokens per sequence


def capacity(weight_bytes: int, per_token: int, card_memory_gb: float, context: int | None) -> Capacity:
    tokens = max(0, int((card_memory_gb * GIB - weight_bytes) // per_token))
    return Capacity(
        card_memory_gb=card_memory_gb,
        max_kv_tokens=tokens,
        context=context,
        max_batch=tokens // context if context else None,
    )
