"""The decode harness's regional compilation: one compiled layer graph serves every layer, with the eager result."""

import torch
from transformers import LlamaForCausalLM, StaticCache

from quantflow.evaluation.decode import compiled_layers
from tests.conftest import make_model


def test_one_compiled_layer_graph_serves_every_layer_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = LlamaForCausalLM.from_pretrained(make_model(tmp_path / "m", layers=3), dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))

    def decode_two(step_fn):
        """Prefill eager, then two decode steps through ``step_fn``: the logits of both, and the cache after."""
        cache = StaticCache(config=model.config, max_cache_len=16)

        def step(ids, at):
            return model(ids, past_key_values=cache, cache_position=at, position_ids=at[None]).logits[:, -1]

        model(prompt, past_key_values=cache, cache_position=torch.arange(8))
        run = step_fn(step, cache)
        token = prompt[:, -1:]
        logits = [run(token, torch.tensor([8])), run(token, torch.tensor([9]))]
        return logits, [layer.keys.clone() for layer in cache.layers]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager, eager_keys = decode_two(lambda step, cache: step)
        regional, regional_keys = decode_two(lambda step, cache: compiled_layers(step, model, cache, "default"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # three layers, one graph
    for ours, reference in zip([*regional, *regional_keys], [*eager, *eager_keys]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)  # swapped back


def test_a_model_without_a_matching_layer_list_compiles_the_whole_step(tmp_path):
    model = LlamaForCausalLM.from_pretrained(make_model(tmp_path / "m"), dtype=torch.float32)
    cache = StaticCache(config=model.config, max_cache_len=16)
    assert compiled_layers(lambda ids, at: ids, model, cache, "default") is not None
    assert compiled_layers(lambda ids, at: ids, model.lm_head, cache, "default") is None  # no decoder layer list
    cache.layers.pop()
    assert compiled_layers(lambda ids, at: ids, model, cache, "default") is None  # a cache laid out differently
