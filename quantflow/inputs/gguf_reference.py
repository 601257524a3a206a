"""How the model's own tokenizer segments text, computed from a GGUF's vocabulary alone (read by ``gguf.GGUFReader``).

A tokenizer built from a GGUF is checked against these segmentations, so the reference must not be the code that
built it:

- SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``: pieces, scores and types) are the
  tokenizer.model the GGUF was converted from, so the reference is Google's ``sentencepiece`` library running a
  model proto rebuilt from those pieces (BPE, byte fallback, user-defined pieces matched whole;
  ``GGUFVocab.pieces``).
- GPT-2 style vocabularies (``"gpt2"``: tokens and ranked merges): text split by the pre-tokenizer regexes
  llama.cpp uses for the GGUF's ``tokenizer.ggml.pre``, bytes mapped to GPT-2's printable characters, then the
  lowest-ranked merge applied until none applies. For a ``pre`` not listed here, the tokenizer's own
  pre-tokenizer splits the text and only the merges are checked.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import regex

from quantflow.inputs.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, GGUFVocab

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), applied one after the other
PRE_SPLITS = {
    "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "starcoder": [r"\p{N}", GPT2_SPLIT],
    "refact": [r"\p{N}", GPT2_SPLIT],
}


def reference(vocab: GGUFVocab, tokenizer) -> Callable[[str], list[int]]:
    """text -> the ids the model's own tokenizer gives it (no BOS), from the GGUF's vocabulary; ``tokenizer`` lends
    only its pre-tokenizer, and only for a GPT-2 style ``pre`` this module does not know."""
    if vocab.model == "llama":
        return sentencepiece(vocab).encode
    if vocab.pre in PRE_SPLITS:
        return bpe(vocab, lambda text: split_words(text, PRE_SPLITS[vocab.pre]))
    own = tokenizer.backend_tokenizer.pre_tokenizer
    return bpe(vocab, lambda text: [unbyte(word) for word, _ in own.pre_tokenize_str(text)] if own else [text])


def sentencepiece(vocab: GGUFVocab):
    """A ``sentencepiece`` processor for the model proto that the GGUF's pieces, scores and types describe."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = vocab.types.count(BYTE) == 256  # sentencepiece wants all or none
    proto.trainer_spec.unk_id = vocab.unk_id if vocab.unk_id is not None else vocab.types.index(UNKNOWN)
    proto.trainer_spec.bos_id = proto.trainer_spec.eos_id = proto.trainer_spec.pad_id = -1  # added by the caller
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = vocab.add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(vocab.pieces(), vocab.scores, vocab.types, strict=True):
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = score
        piece.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE) else CONTROL
    processor = SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


def bpe(vocab: GGUFVocab, pre_tokenize: Callable[[str], list[str]]) -> Callable[[str], list[int]]:
    """GPT-2 style byte-level BPE with the GGUF's tokens and ranked merges, after ``pre_tokenize`` (text -> words)."""
    ranks = {tuple(merge.split(" ", 1)): rank for rank, merge in enumerate(vocab.merges)}
    ids = vocab.index()
    chars = byte_chars()

    def encode(text: str) -> list[int]:
        result: list[int] = []
        for word in pre_tokenize(text):
            parts = [chars[byte] for byte in word.encode()]
            while len(parts) > 1:
                pairs = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
                if not pairs:
                    break
                i = min(pairs)[1]
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            result += [ids.get(part, vocab.unk_id) for part in parts]
        return result

    return encode


def split_words(text: str, patterns: list[str]) -> list[str]:
    """llama.cpp's regex pre-tokenization: each pattern splits every piece left by the one before into its matches
    and the text between them."""
    pieces = [text]
    for pattern in patterns:
        split = []
        for piece in pieces:
            start = 0
            for match in regex.finditer(pattern, piece):
                split += [piece[start : match.start()], match.group()]
                start = match.end()
            split.append(piece[start:])
        pieces = [piece for piece in split if piece]
    return pieces


@cache
def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print stay themselves, the rest move above 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {byte: chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)}


def unbyte(word: str) -> str:
    """A byte-level pre-tokenizer's word as text again (characters outside GPT-2's table are taken as they are)."""
    table = {char: byte for byte, char in byte_chars().items()}
    return b"".join(bytes([table[c]]) if c in table else c.encode() for c in word).decode(errors="replace")
