"""Write a tiny Llama as a real GGUF file (float32 tensors; GPT-2 BPE or SentencePiece vocabulary), laid out as
llama.cpp's converter does.

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
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: the two rotary halves of each head interleaved."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_names(layers: int) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for index in range(layers):
        names.update(
            {
                f"model.layers.{index}.{ours}.weight": f"blk.{index}.{theirs}.weight"
                for ours, theirs in LAYER_NAMES.items()
            }
        )
    return names


USER_DEFINED = ["\n", "\n\n", "\n\n\n", "  ", "    "]  # Gemma's kind: whitespace runs, spaces as llama.cpp stores them


def spm_vocab(size: int = 400) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary as llama GGUFs carry it: '▁' word marks, scores (higher = merged first), <0xNN>
    bytes, a control token and user-defined whitespace runs matched whole (stored with spaces, not '▁')."""
    from pydoc_data.topics import topics

    from tokenizers import SentencePieceBPETokenizer

    spm = SentencePieceBPETokenizer(replacement="▁", add_prefix_space=True)
    spm.train_from_iterator(
        [topics[k] for k in sorted(topics)][:80], vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"]
    )
    bpe = json.loads(spm.to_str())["model"]
    taken = {piece.replace(" ", "▁") for piece in USER_DEFINED}
    learned = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])][3:]
    learned = [t for t in learned if t not in taken]
    rank = {"".join(m) if isinstance(m, list) else m.replace(" ", ""): i for i, m in enumerate(bpe["merges"])}
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", "<start_of_turn>"] + byte_tokens + USER_DEFINED + learned
    scores = [0.0] * (4 + 256) + [-1000.0] * len(USER_DEFINED)
    scores += [-float(rank.get(t, len(rank) + i)) for i, t in enumerate(learned)]
    types = [2, 3, 3, 3] + [6] * 256 + [4] * len(USER_DEFINED) + [1] * len(learned)
    return tokens, scores, types


def write_gguf(
    model_dir: Path,
    path: Path,
    vocab: str = "gpt2",
    add_bos: bool | None = None,
    keep_merges: float = 1.0,
    space_prefix: bool = False,
) -> torch.nn.Module:
    """Write the Llama saved in ``model_dir`` to ``path``; return it in float32 for comparison.

    ``vocab="spm"`` writes a SentencePiece-style vocabulary (tokens, scores, types, no merges) and resizes the
    embeddings to it, with no leading '▁' as Gemma's unless ``space_prefix``; ``keep_merges`` < 1 drops the later
    GPT-2 merges, so whole-word tokens become unreachable.
    """
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    if vocab == "spm":
        tokens, scores, types = spm_vocab()
        model.resize_token_embeddings(len(tokens))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_space_prefix(space_prefix)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in bpe["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")  # the tiny tokenizer's ByteLevel pre-tokenizer splits with GPT-2's regex
        writer.add_token_list([token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])])
        writer.add_token_types([1] * len(bpe["vocab"]))
        writer.add_token_merges(merges[: int(len(merges) * keep_merges)])
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
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
