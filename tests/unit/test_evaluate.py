"""The evaluation protocol: windows, perplexity arithmetic, KL, speed records."""

import math

import pytest
import torch
import torch.nn.functional as F

from quantflow.evaluation.evaluate import evaluate_model, load_for_eval, score, windows
from quantflow.spec import EvaluationSpec, SpeedSpec


def test_non_overlapping_windows_score_every_token_once():
    result = windows(total=100, span=30, stride=30, limit=None)
    assert [(w.start, w.length, w.scored_from) for w in result] == [(0, 30, 0), (30, 30, 0), (60, 30, 0), (90, 10, 0)]


def test_strided_windows_score_only_new_tokens():
    result = windows(total=100, span=40, stride=20, limit=None)
    scored = []
    for w in result:
        scored += list(range(w.start + w.scored_from, w.start + w.length))
    assert scored == list(range(100)) and result[1].scored_from == 20


def test_window_limit():
    assert len(windows(total=1000, span=10, stride=10, limit=3)) == 3


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_eval(str(tiny_model), "cpu", "float32")


def manual_nll(model, ids, span, bos):
    total, count = 0.0, 0
    for start in range(0, ids.numel(), span):
        chunk = ids[start : start + span]
        inputs = torch.cat([torch.tensor([bos]), chunk])
        logits = model(inputs.unsqueeze(0)).logits[0, :-1]
        total += F.cross_entropy(logits.float(), chunk, reduction="sum").item()
        count += chunk.numel()
    return total / count, count


def test_perplexity_matches_a_direct_computation(loaded, tmp_path):
    model, tokenizer = loaded
    ids = tokenizer(
        "The quick brown fox jumps over the lazy dog. " * 12, add_special_tokens=False, return_tensors="pt"
    )["input_ids"][0]
    spec = EvaluationSpec(window=32, kl_tokens=40)
    with torch.no_grad():
        expected, count = manual_nll(model, ids, 31, tokenizer.bos_token_id)
        nll, scored, kl, _ = score(model, ids, spec, 31, tokenizer.bos_token_id, None, tmp_path / "base.safetensors")
        assert scored == count == ids.numel()
        assert nll == pytest.approx(expected, rel=1e-5)
        _, _, self_kl, kl_tokens = score(
            model, ids, spec, 31, tokenizer.bos_token_id, tmp_path / "base.safetensors", None
        )
    assert kl is None and kl_tokens == 40 and abs(self_kl) < 1e-3


def test_evaluate_model_record(loaded):
    model, tokenizer = loaded
    spec = EvaluationSpec(
        window=64,
        max_windows=2,
        kl_tokens=0,
        prompts=["Hello", "Bye"],
        max_new_tokens=3,
        speed=SpeedSpec(batch_sizes=[1, 2], prompt_len=8, gen_len=4, prefill_len=10**6, warmup=0, repeats=2),
    )
    record = evaluate_model(
        model,
        tokenizer,
        "baseline",
        ["some text to evaluate on " * 40],
        spec,
        "test runtime",
        (123, "on_disk"),
        None,
        None,
    )
    assert record.protocol["scored_tokens"] == 2 * 63 and record.protocol["window_tokens"] == 64
    assert math.isclose(record.perplexity, math.exp(record.nll_per_token), rel_tol=1e-3)
    assert [s.batch for s in record.speed] == [1, 2]
    assert all(s.decode_tokens_per_s > 0 and s.prefill_tokens_per_s > 0 for s in record.speed)
    # the long prompt is capped so that it and its one decode step fit the model's context
    assert record.prefill.prompt_len == model.config.max_position_embeddings - 2 and record.prefill.tokens_per_s > 0
    assert [g["prompt"] for g in record.generations] == ["Hello", "Bye"]
    assert record.peak_memory_mb > 0 and record.size_bytes == 123


def test_placement_counts_weights_accelerate_offloaded_as_host_memory():
    from quantflow.evaluation.evaluate import placement

    offloaded = torch.nn.Linear(8192, 8192, bias=False, dtype=torch.bfloat16, device="meta")  # 0.125 GiB
    resident = torch.nn.Linear(8192, 4096, bias=False, dtype=torch.bfloat16)  # 0.0625 GiB
    assert placement(torch.nn.Sequential(offloaded, resident)) == {"cpu": 0.188}
