"""A GGUF's tokenizer, checked against the GGUF's own vocabulary and rebuilt from it where transformers gets it wrong.

transformers turns a GGUF's vocabulary into a Hugging Face tokenizer. The result can round-trip text and still be
wrong: it drops the BOS token the GGUF asks for, takes the EOS token from the BOS id, ignores the user-defined
pieces of a SentencePiece vocabulary (Gemma's runs of newlines and spaces), and a run then measures noise
(Gemma 3 270M: baseline perplexity 36 instead of 15.6). So the saved-and-reloaded tokenizer is checked against
the vocabulary that ``gguf.GGUFReader`` reads from the file:

- vocabulary: every id names the GGUF's token, and there are no others;
- BOS/EOS: the GGUF's tokens, BOS put in front of a text exactly when the GGUF asks for it;
- special tokens: the GGUF's control tokens are special, never split;
- merges (GPT-2 style vocabularies): the GGUF's merges, in the GGUF's order;
- splits: probe texts (prose, code, runs of spaces and newlines, digits, characters outside the vocabulary)
  come out as the model's own tokenizer segments them (``gguf_reference``).

A SentencePiece tokenizer that fails is rebuilt from the GGUF's tokens, scores and types (BPE merges ranked by the
merged token's score, user-defined pieces matched whole); a GPT-2 style one gets the GGUF's BOS/EOS tokens and BOS
where the GGUF asks for it. Whatever still disagrees is refused with the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from quantflow.errors import QuantflowError
from quantflow.inputs.gguf_reference import reference
from quantflow.inputs.gguf_vocab import CONTROL, NORMAL, SPACE, USER_DEFINED, GGUFVocab, read_vocab

PROBES = [
    "The capital of France is Paris.",
    "def f(x):\n    return x * 2  # doubles the value\n\n\nclass A:\n\tpass",
    "A function returns the value of the expression; the object is created when the class is called.",
    "Prices rose 12.5% in 2024 (from $1,234 to $1,388)...  naïve café, 東京, ✓ — “quoted” 𝄞",
    "  leading spaces,\n\n\n\nfour newlines,    four spaces, trailing space ",
]


def problems(tokenizer, vocab: GGUFVocab) -> list[str]:
    """How ``tokenizer`` disagrees with the GGUF's vocabulary (empty: it agrees)."""
    checks: list[Callable[[object, GGUFVocab], str | None]] = [vocabulary, bos, special_ids, control, merges, splits]
    return [found for check in checks if (found := check(tokenizer, vocab))]


def vocabulary(tokenizer, vocab: GGUFVocab) -> str | None:
    """Ids must name the GGUF's tokens: the model's embedding rows are indexed by them."""
    if len(tokenizer) != len(vocab.tokens):
        return f"it has {len(tokenizer)} tokens, the GGUF {len(vocab.tokens)}"
    ours = tokenizer.convert_ids_to_tokens(list(range(len(vocab.tokens))))
    wrong = [i for i, (token, theirs) in enumerate(zip(ours, vocab.tokens, strict=True)) if token != theirs]
    if wrong:
        return f"its token {wrong[0]} is {ours[wrong[0]]!r}, the GGUF's is {vocab.tokens[wrong[0]]!r}"
    return None


def bos(tokenizer, vocab: GGUFVocab) -> str | None:
    first = tokenizer("Hello world")["input_ids"][:1]
    if vocab.add_bos and vocab.bos_id is not None and first != [vocab.bos_id]:
        return f"it does not start text with BOS ({vocab.tokens[vocab.bos_id]!r}), which the GGUF asks for"
    if not vocab.add_bos and vocab.bos_id is not None and first == [vocab.bos_id]:
        return "it adds BOS, which the GGUF does not ask for"
    return None


def special_ids(tokenizer, vocab: GGUFVocab) -> str | None:
    for role, wanted in (("bos", vocab.bos_id), ("eos", vocab.eos_id)):
        actual = getattr(tokenizer, f"{role}_token_id")
        if wanted is not None and actual != wanted:
            shown = tokenizer.convert_ids_to_tokens(actual) if actual is not None else None
            return f"its {role.upper()} token is {shown!r}, the GGUF's is {vocab.tokens[wanted]!r}"
    return None


def control(tokenizer, vocab: GGUFVocab) -> str | None:
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    missing = [token for token in vocab.of_type(CONTROL) if token not in special]
    return f"it does not keep the GGUF's control tokens {missing[:3]} whole" if missing else None


def merges(tokenizer, vocab: GGUFVocab) -> str | None:
    if vocab.model == "llama":
        return None  # SentencePiece vocabularies carry scores, not merges: the splits check covers them
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    ours = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges", [])]
    if ours != vocab.merges:
        rank = next(
            (i for i, (a, b) in enumerate(zip(ours, vocab.merges)) if a != b), min(len(ours), len(vocab.merges))
        )
        return f"its BPE merges differ from the GGUF's from rank {rank} on ({len(ours)} vs {len(vocab.merges)} merges)"
    return None


def splits(tokenizer, vocab: GGUFVocab) -> str | None:
    """The probes as the model's own tokenizer splits them (``gguf_reference``): a tokenizer can hold the right
    vocabulary and merges and still segment text as the model never saw it."""
    try:
        encode = reference(vocab, tokenizer)
    except (RuntimeError, OSError, ValueError) as error:  # sentencepiece refuses duplicate or malformed pieces
        return f"the GGUF's vocabulary is not a valid SentencePiece model ({str(error).splitlines()[0][:120]})"
    index = vocab.index()
    for text in PROBES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        wanted = encode(text)
        if ids != wanted:
            at = next((i for i, (a, b) in enumerate(zip(ids, wanted)) if a != b), min(len(ids), len(wanted)))
            return (
                f"it splits {text[:40]!r} as {tokenizer.convert_ids_to_tokens(ids[at : at + 6])} from token {at} "
                f"on, the model's own tokenizer as {[vocab.pieces()[i] for i in wanted[at : at + 6]]}"
            )
        if vocab.model != "llama" and (split := split_words(index, text, ids)):
            return (
                f"it splits the words {split[:5]} of {text[:40]!r}, which the GGUF's vocabulary holds as single tokens"
            )
    return None


def split_words(index: dict[str, int], text: str, ids: list[int]) -> list[str]:
    """GPT-2 style vocabularies: the words of ``text`` that the vocabulary holds whole ('Ġword') but ``ids`` do not
    contain (merges that cannot reach the vocabulary's own tokens: a GGUF that lost some of its merges)."""
    return [word for word in re.findall(r"(?<= )[A-Za-z]+\b", text) if index.get("Ġ" + word, -1) not in (-1, *ids)]


def rebuild_spm(vocab: GGUFVocab):
    """A Hugging Face tokenizer that segments text as sentencepiece does with this vocabulary: BPE whose merges are
    ranked by the merged token's score, byte fallback, and the user-defined pieces (which the GGUF holds with spaces,
    not '▁') matched whole, longest first, in the raw text before BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    index = vocab.index()
    pairs = [
        (token[:cut], token[cut:], vocab.scores[i])
        for i, token in enumerate(vocab.tokens)
        if vocab.types[i] == NORMAL
        for cut in range(1, len(token))
        if token[:cut] in index and token[cut:] in index
    ]
    merges = [(left, right) for left, right, _ in sorted(pairs, key=lambda pair: -pair[2])]
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    core = Tokenizer(BPE(index, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # spaces become '▁', and the dummy '▁' goes in front of the text only, as sentencepiece puts it (not after each
    # user-defined piece; sentencepiece differs only for a text that starts with one: the splits check finds that)
    core.pre_tokenizer = pre_tokenizers.Metaspace(
        SPACE, prepend_scheme="first" if vocab.add_space_prefix else "never", split=False
    )
    core.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if vocab.add_space_prefix else [])
    )
    core.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in vocab.of_type(CONTROL)])
    core.add_tokens([AddedToken(token, normalized=False, special=False) for token in vocab.of_type(USER_DEFINED)])
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
