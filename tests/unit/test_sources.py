"""Model sources: local folders are checked before anything loads them."""

import shutil
from pathlib import Path

import pytest

from quantflow.errors import QuantflowError
from quantflow.infra.cache import StepCache
from quantflow.inputs.sources import check_model_folder, folder_fingerprint, resolve_model
from quantflow.spec import ModelSpec


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_local_folder_resolves_with_content_fingerprint(tiny_model, tmp_path):
    ref = resolve_model(ModelSpec(source=str(tiny_model)), StepCache(tmp_path))
    assert ref.path == str(tiny_model.resolve()) and ref.fingerprint == folder_fingerprint(tiny_model)
    changed = copy_model(tiny_model, tmp_path / "changed")
    (changed / "generation_config.json").write_text('{"temperature": 0.5}')
    assert folder_fingerprint(changed) != ref.fingerprint


def test_a_local_models_digests_are_remembered_until_a_file_changes(tiny_model, tmp_path, monkeypatch):
    model = copy_model(tiny_model, tmp_path / "model")
    cache = StepCache(tmp_path / "cache")
    first = resolve_model(ModelSpec(source=str(model)), cache).fingerprint
    assert first == folder_fingerprint(model)  # remembering changes no fingerprint (nor any cache key)

    def no_reading(path, chunk=0):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr("quantflow.inputs.sources.file_sha256", no_reading)
    monkeypatch.setattr("quantflow.infra.cache.file_sha256", no_reading)
    assert resolve_model(ModelSpec(source=str(model)), cache).fingerprint == first
    monkeypatch.undo()
    (model / "generation_config.json").write_text('{"temperature": 0.5}')
    assert resolve_model(ModelSpec(source=str(model)), cache).fingerprint != first


def test_missing_path_and_not_a_hub_id(tmp_path):
    with pytest.raises(QuantflowError, match="neither an existing folder nor a hub id"):
        resolve_model(ModelSpec(source="./no/such/model"), StepCache(tmp_path))


def test_folder_without_config(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(QuantflowError, match="has no config.json"):
        check_model_folder(folder)


def test_pickle_only_weights_are_refused(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(QuantflowError, match="safetensors only"):
        check_model_folder(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors_is_refused(tiny_model, tmp_path, damage):
    folder = copy_model(tiny_model, tmp_path / "m")
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(QuantflowError, match="corrupt|not a valid safetensors"):
        check_model_folder(folder)


def test_gguf_path_must_exist(tmp_path):
    with pytest.raises(QuantflowError, match="GGUF file .* does not exist"):
        resolve_model(ModelSpec(source=str(tmp_path / "x.gguf")), StepCache(tmp_path))


def test_unreachable_hub_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(QuantflowError, match="could not reach the Hugging Face hub|does not exist"):
        resolve_model(ModelSpec(source="facebook/opt-125m"), StepCache(tmp_path))


def test_gguf_file_converts_to_an_identical_safetensors_model(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.gguf_writer import write_gguf

    original = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    ref = resolve_model(ModelSpec(source=str(tmp_path / "tiny.gguf"), dtype="float32"), StepCache(tmp_path / "cache"))
    assert (Path(ref.path) / "model.safetensors").is_file() and (Path(ref.path) / "tokenizer.json").is_file()
    assert "quantization_config" not in (Path(ref.path) / "config.json").read_text()
    converted = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(converted(ids).logits, original(ids).logits)
    assert (
        resolve_model(ModelSpec(source=str(tmp_path / "tiny.gguf"), dtype="float32"), StepCache(tmp_path / "cache"))
        == ref
    )  # cached


def test_truncated_gguf_is_refused_and_leaves_nothing(tiny_model, tmp_path):
    from tests.gguf_writer import write_gguf

    write_gguf(tiny_model, tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(QuantflowError, match="could not be read as a GGUF model"):
        resolve_model(ModelSpec(source=str(tmp_path / "cut.gguf")), StepCache(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not list(models.iterdir())


def test_a_sentencepiece_gguf_gets_a_tokenizer_that_matches_its_vocabulary(tiny_model, tmp_path):
    """transformers' own tokenizer for such a GGUF round-trips text but drops the BOS the GGUF asks for and takes EOS
    from the BOS id; the converted folder's tokenizer (saved and reloaded) tokenizes as llama.cpp does with the same
    vocabulary."""
    from transformers import AutoTokenizer

    from quantflow.inputs.gguf_reference import reference
    from quantflow.inputs.gguf_tokenizer import PROBES, problems
    from quantflow.inputs.gguf_vocab import read_vocab
    from tests.gguf_writer import write_gguf

    write_gguf(tiny_model, tmp_path / "spm.gguf", vocab="spm")
    vocab = read_vocab(tmp_path / "spm.gguf")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    found = problems(theirs, vocab)
    assert any("BOS" in problem for problem in found), found  # the check catches what transformers gets wrong
    ref = resolve_model(ModelSpec(source=str(tmp_path / "spm.gguf"), dtype="float32"), StepCache(tmp_path / "cache"))
    ours = AutoTokenizer.from_pretrained(ref.path)
    assert problems(ours, vocab) == []
    text = PROBES[2]
    assert ours(text)["input_ids"] == [1] + reference(vocab, ours)(text)
    assert ours.convert_ids_to_tokens(ours("the value")["input_ids"]) == ["<s>", "the", "▁value"]
    assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text
    assert ours.eos_token == "</s>" and ours.bos_token == "<s>"


def test_the_sentencepiece_reference_merges_by_score_and_falls_back_to_bytes():
    """sentencepiece with the GGUF's pieces: highest-scoring adjacent pair first; characters outside the vocabulary
    fall back to byte tokens."""
    from quantflow.inputs.gguf_reference import reference
    from quantflow.inputs.gguf_vocab import GGUFVocab

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), "▁", "a", "b", "▁a", "ab"]
    scores = [0] * 259 + [-1, -1, -1, -3, -2]
    vocab = GGUFVocab(
        model="llama",
        tokens=tokens,
        scores=scores,
        types=[2, 3, 3] + [6] * 256 + [1] * 5,
        merges=[],
        bos_id=1,
        eos_id=2,
        unk_id=0,
        add_bos=True,
        add_space_prefix=True,
    )
    encode = reference(vocab, None)
    assert [tokens[i] for i in encode("ab")] == ["▁", "ab"]  # 'ab' (-2) merges before '▁a' (-3)
    assert [tokens[i] for i in encode("a é")] == ["▁a", "▁", "<0xC3>", "<0xA9>"]


def test_a_gguf_whose_tokenizer_cannot_be_rebuilt_is_refused_and_leaves_nothing(tiny_model, tmp_path):
    """A GPT-2 style GGUF whose merges cannot reach its own whole-word tokens: no correct tokenizer can be made from
    it."""
    from tests.gguf_writer import write_gguf

    write_gguf(tiny_model, tmp_path / "broken.gguf", keep_merges=0.2)
    with pytest.raises(QuantflowError, match="disagrees with the GGUF's vocabulary: it splits the words"):
        resolve_model(ModelSpec(source=str(tmp_path / "broken.gguf")), StepCache(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not list(models.iterdir())


def test_a_sentencepiece_gguf_no_tokenizer_matches_is_refused_and_leaves_nothing(tiny_model, tmp_path):
    """A leading '▁' plus user-defined pieces: sentencepiece puts the '▁' before a text that starts with a run of
    spaces, the rebuilt tokenizer cannot, so the run stops before anything is written."""
    from tests.gguf_writer import write_gguf

    write_gguf(tiny_model, tmp_path / "prefix.gguf", vocab="spm", space_prefix=True)
    with pytest.raises(QuantflowError, match="disagrees with the GGUF's vocabulary: it splits '  leading") as caught:
        resolve_model(ModelSpec(source=str(tmp_path / "prefix.gguf")), StepCache(tmp_path / "cache"))
    assert "original Hugging Face checkpoint" in caught.value.fix
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not list(models.iterdir())
