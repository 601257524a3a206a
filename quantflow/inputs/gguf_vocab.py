"""The tokenizer section of a GGUF file (``tokenizer.ggml.*``), read by the ``gguf`` package's own reader."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

# token types, as llama.cpp and sentencepiece number them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"


class GGUFVocab(BaseModel):
    """Tokens (id = position), their scores and types, GPT-2 style merges, and the special-token settings."""

    model: str
    pre: str = ""
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = []
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_space_prefix: bool

    def index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def of_type(self, kind: int) -> list[str]:
        return [token for token, its in zip(self.tokens, self.types, strict=True) if its == kind]

    def pieces(self) -> list[str]:
        """The tokens as the model's own tokenizer names them. llama.cpp's converter writes a SentencePiece
        vocabulary's user-defined pieces with spaces for '▁' (llama.cpp matches them in the raw text); sentencepiece
        matches them in the normalized text, where spaces are '▁', so they get their '▁' back."""
        if self.model != "llama":
            return list(self.tokens)
        return [
            token.replace(" ", SPACE) if kind == USER_DEFINED else token
            for token, kind in zip(self.tokens, self.types, strict=True)
        ]


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
        pre=value("pre", ""),
        tokens=tokens,
        scores=value("scores", [0.0] * len(tokens)),
        types=value("token_type", [NORMAL] * len(tokens)),
        merges=value("merges", []),
        bos_id=value("bos_token_id"),
        eos_id=value("eos_token_id"),
        unk_id=value("unknown_token_id"),
        add_bos=bool(value("add_bos_token", model == "llama")),
        add_space_prefix=bool(value("add_space_prefix", model == "llama")),
    )
