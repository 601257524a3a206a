"""Write a tiny Llama as a real GGUF file (float32 tensors, GPT-2 BPE tokenizer), laid out as llama.cpp's converter does.

Hand-written because the converter ships with llama.cpp, not with the ``gguf`` package. It
follows the converter: llama.cpp's tensor names, and Q/K rows permuted for its rotary
convention (transformers undoes that permutation when it loads a GGUF).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: the two rotary halves of each head interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_names(layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for index in range(layers):
        names.update({f"model.layers.{index}.{ours}.weight": f"blk.{index}.{theirs}.weight" for ours, theirs in LAYER_NAMES.items()})
    return names


def write_gguf(model_dir: Path, path: Path) -> torch.nn.Module:
    """Write the Llama saved in ``model_dir`` to ``path``; return it in float32 for comparison."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])])
    writer.add_token_types([1] * len(bpe["vocab"]))
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    for ours, theirs in gguf_names(config.num_hidden_layers).items():
        tensor = state[ours]
        if theirs.endswith("attn_q.weight"):
            tensor = permute(tensor, config.num_attention_heads)
        elif theirs.endswith("attn_k.weight"):
            tensor = permute(tensor, config.num_key_value_heads)
        writer.add_tensor(theirs, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
