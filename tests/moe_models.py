"""Tiny random mixture-of-experts models in transformers 5's layouts, built like tests/conftest.py's dense one."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_tokenizer


def make_moe(
    folder: Path, family: str = "qwen3_moe", hidden: int = 64, layers: int = 2, seed: int = 0, experts: int = 8
) -> Path:
    """A random bf16 MoE with ``experts`` experts, top-2 routing, expert width 32 (Qwen3-MoE, Mixtral or Qwen2-MoE
    shape, the last with a shared expert and its gate)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    shapes = {
        "qwen3_moe": dict(intermediate_size=2 * hidden, moe_intermediate_size=32, num_experts=experts, head_dim=16),
        "mixtral": dict(intermediate_size=32, num_local_experts=experts, head_dim=16),
        "qwen2_moe": dict(
            intermediate_size=2 * hidden,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=experts,
        ),
    }
    config = AutoConfig.for_model(family, **common, **shapes[family])
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder
