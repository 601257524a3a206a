"""GPU memory budgets and multi-GPU placement: a model bigger than its budget on one card still runs in one worker."""

import pytest
import torch

from quantflow.errors import QuantflowError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _run(tmp_path, model, tag: str, variants: list[dict], **top):
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec
    from tests.conftest import small_spec

    raw = small_spec(
        model,
        tmp_path / f"out-{tag}",
        tmp_path / f"cache-{tag}",
        variants,
        speed={"batch_sizes": [1], "prompt_len": 8, "gen_len": 4, "warmup": 0, "repeats": 1},
    )
    raw.update(device="cuda", **top)
    report = load_report(pipeline.run(parse_spec(raw), progress=lambda _: None) / "report.json")
    return {r.name: r for r in report.rows}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """~300 MiB of bf16 weights: more than a 0.25 GiB budget holds on one card."""
    from tests.conftest import make_model

    return make_model(tmp_path_factory.mktemp("wide"), hidden=1024, layers=16)


@two_gpus
def test_a_model_over_one_cards_budget_spreads_over_two_gpus_and_scores_the_same(tmp_path, wide_model, monkeypatch):
    variants = [{"method": "gptq", "group_size": 64}]
    spread = _run(tmp_path, wide_model, "spread", variants, gpu_memory_gb=0.25)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the spawned step processes see one card and no budget
    single = _run(tmp_path, wide_model, "single", variants)
    placement = spread["baseline"].placement
    assert {"cuda:0", "cuda:1"} <= set(placement), placement
    assert max(v for k, v in placement.items() if k.startswith("cuda")) <= 0.25 * 0.8 + 0.01
    assert single["baseline"].placement == {}
    assert spread["baseline"].peak_memory_mb / 1024 <= 2 * 0.25  # summed over both cards, each under its cap
    for name in ("baseline", "gptq"):
        assert spread[name].perplexity == pytest.approx(single[name].perplexity, rel=2e-3)
    assert spread["gptq"].quantize_peak_memory_mb / 1024 <= 0.25


def test_a_step_over_the_budget_fails_naming_the_setting(tmp_path, wide_model):
    with pytest.raises(QuantflowError, match="gpu_memory_gb of 0.001 GiB") as error:
        _run(tmp_path, wide_model, "tiny", [{"method": "gptq", "group_size": 64}], gpu_memory_gb=0.001)
    assert "raise gpu_memory_gb" in error.value.fix
    assert not (tmp_path / "out-tiny" / "gptq").exists()
