"""Random-weight Llama models of real shapes for speed benchmarks (speed does not depend on weight values)."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {  # Llama-3.2-1B-like width with a TinyLlama depth (1.1B), and Llama-2-7B
    "1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
}


def build_baseline(folder: Path, shape: str) -> None:
    """A random-weight bf16 Llama of the given shape, with a small tokenizer (quantize steps save one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    tokenizer = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
