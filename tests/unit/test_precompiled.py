"""The decode step compiled once per shape family: a later process loads it instead of tracing, with eager results."""

from pathlib import Path

import torch
from transformers import LlamaForCausalLM, StaticCache

from quantflow.evaluation.decode import decode_logits
from quantflow.evaluation.precompiled import _load, family_key, load_or_compile
from quantflow.infra.steps import isolated
from tests.conftest import make_model


def decode_in_fresh_process(model_dir: str, folder: str) -> dict:
    """In this (spawned) process: prefill eager, then one step through ``load_or_compile`` and one eager."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = StaticCache(config=model.config, max_cache_len=12)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    token, at = prompt[:, -1:], torch.tensor([8])

    def reset() -> None:  # the cache counts what was written to it: each step starts from the prompt alone
        cache.reset()
        model(prompt, past_key_values=cache, cache_position=torch.arange(8))

    with torch.no_grad():
        reset()
        torch._dynamo.utils.counters.clear()
        compiled, how = load_or_compile(decode_logits, (model, cache, token, at), "default", Path(folder), reset)
        reset()
        ours = compiled(model, cache, token, at)
        traced = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        reset()
        eager = decode_logits(model, cache, token, at)
        [path] = Path(folder).glob("*.step")
        doubled = _load(path, lambda *args: 2 * decode_logits(*args), (model, cache, token, at), reset)
    return {"how": how, "ours": ours, "eager": eager, "traced_graphs": traced, "refuses_a_mismatch": doubled is None}


def test_a_later_process_of_the_same_shape_loads_the_step_and_a_damaged_file_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = tmp_path / "steps"
    first, other_weights = make_model(tmp_path / "a", seed=0), make_model(tmp_path / "b", seed=1)

    def run(model_dir: Path) -> dict:
        result = isolated("decode", None, decode_in_fresh_process, str(model_dir), str(folder))
        torch.testing.assert_close(result["ours"], result["eager"], rtol=1e-4, atol=1e-5)
        return result

    assert run(first)["how"] == "compiled and saved"
    [saved] = folder.glob("*.step")
    loaded = run(other_weights)  # same structure, other weights: the saved step reads this model's tensors
    assert (loaded["how"], loaded["traced_graphs"]) == ("loaded", 0)
    assert loaded["refuses_a_mismatch"]  # a loaded step whose logits are off the eager step's is not used
    saved.write_bytes(b"damaged")
    assert run(other_weights)["how"] == "compiled and saved"
    assert run(first)["how"] == "loaded"
    assert not list(folder.glob(".tmp-*"))


def test_the_family_key_changes_with_the_structure_and_not_with_the_weights(tmp_path):
    def key(model_dir: Path, batch: int = 1, cache_len: int = 12, mode: str = "default") -> str:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        cache.early_initialization(batch, 2, 16, torch.float32, torch.device("cpu"))
        token, at = torch.zeros(batch, 1, dtype=torch.long), torch.tensor([8])
        return family_key(decode_logits, (model, cache, token, at), mode)

    first = make_model(tmp_path / "a", seed=0)
    reference = key(first)
    assert key(make_model(tmp_path / "b", seed=1)) == reference
    others = [
        key(make_model(tmp_path / "c", layers=3)),
        key(make_model(tmp_path / "d", hidden=32)),
        key(first, batch=2),
        key(first, cache_len=16),
        key(first, mode="max-autotune-no-cudagraphs"),
    ]
    assert len({reference, *others}) == 6
