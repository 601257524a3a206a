"""Scheme checks before calibration, recipes, and llm-compressor runs on a tiny model."""

import json

import pytest
import torch

from quantflow.errors import QuantflowError
from quantflow.infra.resources import Resources
from quantflow.inputs.calibration import build_calibration
from quantflow.quantization.quantize import (
    Scheme,
    calibration_data,
    check_ignore,
    cpu_safe_awq,
    equal_length_batches,
    quantize_weights,
    resolve_group_size,
    weightless_model,
)
from quantflow.spec import AWQVariant, CalibrationSpec, EvaluationSpec, GPTQVariant, RTNVariant


def test_group_size_that_divides_nothing_names_layers_and_fix(tiny_model_96):
    skeleton = weightless_model(str(tiny_model_96))
    with pytest.raises(QuantflowError) as info:
        resolve_group_size(skeleton, GPTQVariant(name="gptq", group_size=64))
    message = str(info.value)
    assert "does not divide the input width of 12 layers" in message
    assert "model.layers.0.self_attn.q_proj (96)" in message and "use group_size 32" in message


def test_auto_group_size_rule_is_reported(tiny_model_96):
    scheme = resolve_group_size(weightless_model(str(tiny_model_96)), RTNVariant(name="rtn", group_size="auto"))
    assert scheme.group_size == 32 and "largest of 128/64/32" in scheme.note


def test_the_default_group_size_fits_any_width(tiny_model, tiny_model_96, tmp_path):
    """The default is 'auto': 64 for width 64, 32 for width 96, per output channel when no size of 128/64/32 divides."""
    from tests.conftest import make_model

    assert resolve_group_size(weightless_model(str(tiny_model)), RTNVariant(name="rtn")).group_size == 64
    assert resolve_group_size(weightless_model(str(tiny_model_96)), GPTQVariant(name="gptq")).group_size == 32
    odd = make_model(tmp_path / "odd", hidden=40)
    scheme = resolve_group_size(weightless_model(str(odd)), RTNVariant(name="rtn"))
    assert scheme.group_size is None and "per output channel" in scheme.note


def test_per_channel_needs_no_division(tiny_model_96):
    assert resolve_group_size(weightless_model(str(tiny_model_96)), RTNVariant(name="rtn", group_size=None)) == Scheme(
        group_size=None
    )


def test_tied_lm_head_cannot_be_quantized(tmp_path):
    from tests.conftest import make_model

    folder = make_model(tmp_path / "tied", tie=True)
    with pytest.raises(QuantflowError, match="tied to the input embeddings"):
        check_ignore(weightless_model(str(folder)), RTNVariant(name="rtn", ignore=[]))


def test_ignore_everything_is_refused(tiny_model):
    with pytest.raises(QuantflowError, match="quantizes no layer"):
        check_ignore(weightless_model(str(tiny_model)), RTNVariant(name="rtn", ignore=["re:.*"]))


def test_awq_pinning_is_skipped_only_without_accelerator():
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    with cpu_safe_awq():
        assert (IntermediatesCache.pin_memory is original) == torch.accelerator.is_available()
    assert IntermediatesCache.pin_memory is original


@pytest.fixture(scope="module")
def calibration(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    return build_calibration(
        CalibrationSpec(num_samples=8, seq_len=64), EvaluationSpec(), str(tiny_model), folder, folder
    )


@pytest.mark.parametrize(
    "variant",
    [
        RTNVariant(name="rtn", group_size=32),
        GPTQVariant(name="gptq", group_size=32, actorder=None),
        AWQVariant(name="awq", group_size=32, n_grid=4),
    ],
    ids=lambda v: v.method,
)
def test_llmcompressor_writes_a_compressed_checkpoint(tiny_model, calibration, tmp_path, variant):
    record = quantize_weights(
        str(tiny_model), variant, Scheme(group_size=32), calibration, Resources(device="cpu"), tmp_path, tmp_path
    )
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, variant.symmetric)
    assert len(record.quantized_layers) == 14 and record.skipped_layers == ["lm_head"]
    assert record.seconds > 0 and record.peak_memory_mb > 0
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as shard:
        keys = set(shard.keys())
        assert (
            "model.layers.0.mlp.down_proj.weight_packed" in keys and "model.layers.0.mlp.down_proj.weight_scale" in keys
        )
        assert shard.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_equal_length_batches_keep_every_sample_and_never_mix_lengths():
    lengths = [64, 64, 30, 64, 30, 64, 64, 17]
    batches = equal_length_batches(lengths, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(batch) <= 2 and len({lengths[i] for i in batch}) == 1 for batch in batches)
    assert [lengths[batch[0]] for batch in batches] == [64, 64, 64, 30, 17]


@pytest.mark.parametrize(
    "variant",
    [GPTQVariant(name="gptq", group_size=32, actorder=None), AWQVariant(name="awq", group_size=32, n_grid=4)],
    ids=lambda v: v.method,
)
def test_batched_calibration_quantizes_like_one_sample_at_a_time(tiny_model, tmp_path, variant):
    """Equal-length batches are the same sums as single samples: the packed weights agree but for rounding ties."""
    from safetensors.torch import load_file

    from quantflow.inputs.calibration import load_samples

    spec = CalibrationSpec(num_samples=12, seq_len=160)
    (tmp_path / "c").mkdir()
    calibration = build_calibration(spec, EvaluationSpec(), str(tiny_model), tmp_path / "c", tmp_path / "c")
    lengths = [len(ids) for ids in load_samples(calibration)]
    assert len(set(lengths)) > 1 and lengths.count(160) > 4  # mixed lengths, several batches of equal ones
    loader = calibration_data(calibration, 4)["dataset"]
    assert sum(batch["input_ids"].shape[0] for batch in loader) == calibration.samples
    assert sum(batch["input_ids"].numel() for batch in loader) == calibration.tokens
    saved = {}
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        resources = Resources(device="cpu", calibration_batch=batch)
        quantize_weights(str(tiny_model), variant, Scheme(group_size=32), calibration, resources, out, out)
        saved[batch] = load_file(str(out / "model.safetensors"))
    for key, single in saved[1].items():
        if key.endswith("weight_packed"):
            nibbles = [torch.stack([(t >> (4 * i)) & 0xF for i in range(8)]) for t in (single, saved[4][key])]
            assert (nibbles[0] == nibbles[1]).float().mean() > 0.99, key
        elif key.endswith("weight_scale"):
            torch.testing.assert_close(saved[4][key].float(), single.float(), rtol=0.02, atol=1e-6)
