"""A GGUF's tokenizer, checked against the GGUF's own vocabulary and rebuilt from it where transformers gets it wrong.

transformers turns a GGUF's vocabulary into a Hugging Face tokenizer. For SentencePiece-style
vocabularies (``tokenizer.ggml.model == "llama"``: tokens with scores, no merges) the result can
round-trip text and still be wrong: it drops the BOS token the GGUF asks for, takes the EOS token
from the BOS id, or segments words differently from the runtime the GGUF was made for, and a run
then measures noise. So the saved-and-reloaded tokenizer is compared with what llama.cpp would do
with the same vocabulary:

- SentencePiece vocabularies: llama.cpp's algorithm, reproduced here (spaces become '▁', an optional
  leading '▁', then the adjacent pair whose concatenation is a token with the highest score is
  merged until none is left, unknown characters fall back to '<0xNN>' byte tokens). Hand-written
  because no installed package tokenizes a GGUF vocabulary the way llama.cpp does.
- GPT-2 style vocabularies (``"gpt2"``: tokens and merges): every whole word of the probe text that
  the vocabulary holds as one token ('Ġword') must come out as that token.
- Both: BOS is added exactly when the GGUF says so, and BOS/EOS are the GGUF's tokens.

A SentencePiece tokenizer that fails is rebuilt from the GGUF's tokens and scores (BPE merges ranked
by the merged token's score, which is llama.cpp's rule); a GPT-2 style one gets the GGUF's BOS/EOS
tokens and BOS where the GGUF asks for it.
Whatever still disagrees is refused with the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError

SPACE = "▁"
PROBES = [
    "The capital of France is Paris.",
    "def f(x):\n    return x * 2  # doubles the value",
    "A function returns the value of the expression; the object is created when the class is called.",
]


class GGUFVocab(BaseModel):
    """The tokenizer section of a GGUF file (``tokenizer.ggml.*``)."""

    model: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_space_prefix: bool

    def index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}


def read_vocab(path: Path) -> GGUFVocab:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str, default=None):
        field = fields.get(f"tokenizer.ggml.{key}")
        return field.contents() if field is not None else default

    model = value("model", "")
    tokens = value("tokens", [])
    return GGUFVocab(
        model=model,
        tokens=tokens,
        scores=value("scores", [0.0] * len(tokens)),
        types=value("token_type", [1] * len(tokens)),
        bos_id=value("bos_token_id"),
        eos_id=value("eos_token_id"),
        unk_id=value("unknown_token_id"),
        add_bos=bool(value("add_bos_token", model == "llama")),
        add_space_prefix=bool(value("add_space_prefix", True)),
    )


def spm_reference(vocab: GGUFVocab, text: str, ids: dict[str, int] | None = None) -> list[int]:
    """llama.cpp's SentencePiece tokenization of ``text`` (no special tokens); ``ids`` is ``vocab.index()`` if already
    built."""
    ids = ids or vocab.index()
    symbols = list((SPACE if vocab.add_space_prefix else "") + text.replace(" ", SPACE))
    while True:
        best, best_score = None, None
        for i in range(len(symbols) - 1):
            merged = ids.get(symbols[i] + symbols[i + 1])
            if merged is not None and (best_score is None or vocab.scores[merged] > best_score):
                best, best_score = i, vocab.scores[merged]
        if best is None:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    result: list[int] = []
    for symbol in symbols:
        if symbol in ids:
            result.append(ids[symbol])
        else:
            result += [ids.get(f"<0x{byte:02X}>", vocab.unk_id) for byte in symbol.encode()]
    return result


def problems(tokenizer, vocab: GGUFVocab) -> list[str]:
    """How ``tokenizer`` disagrees with the GGUF's vocabulary (empty: it agrees)."""
    found = []
    first = tokenizer("Hello world")["input_ids"][:1]
    if vocab.add_bos and vocab.bos_id is not None and first != [vocab.bos_id]:
        found.append(f"it does not start text with BOS ({vocab.tokens[vocab.bos_id]!r}), which the GGUF asks for")
    if not vocab.add_bos and vocab.bos_id is not None and first == [vocab.bos_id]:
        found.append("it adds BOS, which the GGUF does not ask for")
    for role, wanted in (("bos", vocab.bos_id), ("eos", vocab.eos_id)):
        actual = getattr(tokenizer, f"{role}_token_id")
        if wanted is not None and actual is not None and actual != wanted:
            found.append(
                f"its {role.upper()} token is {tokenizer.convert_ids_to_tokens(actual)!r}, the GGUF's is "
                f"{vocab.tokens[wanted]!r}"
            )
    index = vocab.index()
    for text in PROBES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        wanted = spm_reference(vocab, text, index) if vocab.model == "llama" else ids
        if ids != wanted:
            shown = [vocab.tokens[i] for i in wanted][:12]
            found.append(
                f"it splits {text[:40]!r} as {tokenizer.convert_ids_to_tokens(ids)[:12]}, the GGUF's vocabulary as "
                f"{shown}"
            )
            break
        if vocab.model != "llama" and (split := split_words(index, text, ids)):
            found.append(
                f"it splits the words {split[:5]} of {text[:40]!r}, which the GGUF's vocabulary holds as single tokens"
            )
            break
    return found


def split_words(index: dict[str, int], text: str, ids: list[int]) -> list[str]:
    """GPT-2 style vocabularies: the words of ``text`` that the vocabulary holds whole ('Ġword') but ``ids`` do not
    contain."""
    return [word for word in re.findall(r"(?<= )[A-Za-z]+", text) if index.get("Ġ" + word, -1) not in (-1, *ids)]


def rebuild_spm(vocab: GGUFVocab):
    """A Hugging Face tokenizer that tokenizes as llama.cpp does with this SentencePiece vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    index = vocab.index()
    pairs = [
        (token[:cut], token[cut:], vocab.scores[i])
        for i, token in enumerate(vocab.tokens)
        if vocab.types[i] == 1
        for cut in range(1, len(token))
        if token[:cut] in index and token[cut:] in index
    ]
    merges = [(left, right) for left, right, _ in sorted(pairs, key=lambda pair: -pair[2])]
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    core = Tokenizer(BPE(index, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPACE)] if vocab.add_space_prefix else []) + [normalizers.Replace(" ", SPACE)]
    )
    core.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if vocab.add_space_prefix else [])
    )
    special = [vocab.tokens[i] for i, kind in enumerate(vocab.types) if kind == 3]
    core.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    named = {
        role: vocab.tokens[i]
        for role, i in (("bos_token", vocab.bos_id), ("eos_token", vocab.eos_id), ("unk_token", vocab.unk_id))
        if i is not None
    }
    if vocab.add_bos and vocab.bos_id is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{named['bos_token']} $A",
            pair=f"{named['bos_token']} $A $B",
            special_tokens=[(named["bos_token"], vocab.bos_id)],
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, **named)


def with_specials(tokenizer, vocab: GGUFVocab):
    """``tokenizer`` with the GGUF's own BOS and EOS tokens, and BOS put in front of every text when the GGUF asks for
    it."""
    from tokenizers import processors

    if vocab.bos_id is not None:
        tokenizer.bos_token = vocab.tokens[vocab.bos_id]
    if vocab.eos_id is not None:
        tokenizer.eos_token = vocab.tokens[vocab.eos_id]
    if vocab.add_bos and vocab.bos_id is not None:
        bos = vocab.tokens[vocab.bos_id]
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab.bos_id)]
        )
    return tokenizer


def checked_tokenizer(tokenizer, gguf: Path, work: Path):
    """``tokenizer`` as saved and reloaded (under ``work``), checked against the GGUF; rebuilt or refused when it
    disagrees."""
    from transformers import AutoTokenizer

    vocab = read_vocab(gguf)

    def reloaded(candidate, name: str):
        candidate.save_pretrained(work / name)
        return AutoTokenizer.from_pretrained(work / name)

    given = reloaded(tokenizer, "given")
    if not problems(given, vocab):
        return given
    fixed = reloaded(rebuild_spm(vocab) if vocab.model == "llama" else with_specials(given, vocab), "rebuilt")
    left = problems(fixed, vocab)
    if left:
        raise QuantflowError(
            f"the tokenizer transformers builds from {gguf.name} disagrees with the GGUF's vocabulary: {left[0]}; "
            "quantflow could not rebuild a correct one, so this run would measure noise",
            "use the original Hugging Face checkpoint of this model (its tokenizer files) instead of the GGUF",
        )
    return fixed
