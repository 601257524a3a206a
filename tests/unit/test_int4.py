"""Int4 execution of saved artifacts (PyTorch's CPU int4 kernel here; the CUDA twin in tests/gpu) and the decode
harness."""

import pytest
import torch

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.spec import SpeedSpec, parse_spec
from tests.conftest import make_model, small_spec


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Saved RTN artifacts, with zero points and symmetric, group 32, of a tiny Llama with 128-wide layers."""
    root = tmp_path_factory.mktemp("int4")
    model = make_model(root / "model", hidden=128)
    variants = [
        {"method": "rtn", "group_size": 32, "name": "asym"},
        {"method": "rtn", "group_size": 32, "symmetric": True, "name": "sym"},
        {"method": "rtn", "group_size": None, "name": "channel"},
    ]
    raw = small_spec(model, root / "out", root / "cache", variants)
    raw["evaluation"]["speed"] = None
    return pipeline.run(parse_spec(raw), progress=lambda _: None)


@pytest.mark.parametrize("name", ["asym", "sym"])
def test_int4_layers_match_the_dequantized_reference(artifacts, name):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.int4 import Int4Linear, load_int4

    dense = AutoModelForCausalLM.from_pretrained(
        artifacts / name, dtype=torch.bfloat16
    )  # transformers' dequantized weights
    packed = load_int4(artifacts / name, "cpu")
    ids = torch.randint(0, 300, (2, 16))
    logits, reference = (
        packed(ids).logits.float(),
        dense(ids).logits.float(),
    )  # the first forward also decompresses `dense`
    assert ((logits - reference).norm() / reference.norm()).item() < 0.02
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 14 and isinstance(packed.lm_head, torch.nn.Linear)  # lm_head stays dense, as quantized
    for layer_name, layer in layers.items():
        x = torch.randn(5, layer.in_features)
        reference = x @ dense.get_submodule(layer_name).weight.float().t()
        plain, size = layer(x).float(), buffer_bytes(layer)
        packed_output = layer.pack()(x).float()
        for form, output in (("plain", plain), ("packed", packed_output)):
            error = ((output - reference).norm() / reference.norm()).item()
            assert error < 0.01, (layer_name, form, error)  # bf16 activations and scales: ~0.2-0.4% expected
        assert layer.is_packed and buffer_bytes(layer) == size  # both forms hold half a byte per weight


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def test_int4_refuses_a_scheme_its_kernels_do_not_cover(artifacts):
    from quantflow.evaluation.int4 import load_int4

    with pytest.raises(QuantflowError, match="groups of"):
        load_int4(artifacts / "channel", "cpu")
    with pytest.raises(QuantflowError, match="not a compressed-tensors"):
        load_int4(artifacts.parent / "model", "cpu")


def test_decode_harness_times_dense_and_int4_alike(artifacts):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.decode import benchmark
    from quantflow.evaluation.int4 import load_int4

    dense = AutoModelForCausalLM.from_pretrained(artifacts / "asym", dtype=torch.bfloat16)
    records = [
        benchmark(model, label, 2, SpeedSpec(batch_sizes=[2], prompt_len=8, gen_len=5, warmup=1, repeats=3))
        for model, label in ((dense, "dense"), (load_int4(artifacts / "asym", "cpu"), "int4"))
    ]
    for record in records:
        assert record.decode_tokens_per_s == pytest.approx(2 / (record.decode_ms_per_step / 1e3), rel=0.01)
        assert (
            record.prefill_ms > 0 and record.repeats == 3 and record.bandwidth_floor_fraction is None
        )  # no GPU, no floor
    assert records[1].weight_bytes < 0.6 * records[0].weight_bytes


@pytest.mark.parametrize("runtime", ["dense", "int4"])
def test_fused_projections_give_the_same_logits_in_one_matmul_each(artifacts, runtime):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.decode import weight_bytes
    from quantflow.evaluation.fuse import FusedProjections, fuse_projections
    from quantflow.evaluation.int4 import Int4Linear, load_int4, pack_all

    model = (
        pack_all(load_int4(artifacts / "asym", "cpu"))  # fusion joins tinygemm's layout; the plain form is apart
        if runtime == "int4"
        else AutoModelForCausalLM.from_pretrained(artifacts.parent / "model")
    )
    ids, size = torch.randint(0, 300, (2, 16)), weight_bytes(model)
    with torch.no_grad():
        reference = model(ids).logits
        assert (
            fuse_projections(model) == 2 * model.config.num_hidden_layers and fuse_projections(model) == 0
        )  # q/k/v and gate/up; once
        fused = model(ids).logits
        attention = model.model.layers[0].self_attn
        x, y = torch.randn(2, 3, attention.fused_q.linear.in_features, dtype=model.dtype)
        q_size, k_size, _ = attention.fused_q.sizes
        attention.q_proj(x)
        other = attention.k_proj(y)  # another input: the slice recomputes instead of returning x's part
        assert torch.equal(other, attention.fused_q.linear(y)[:, q_size : q_size + k_size])
    groups = [m for m in model.modules() if isinstance(m, FusedProjections)]
    assert len(groups) == 4 and all(
        isinstance(g.linear, Int4Linear if runtime == "int4" else torch.nn.Linear) for g in groups
    )
    assert weight_bytes(model) == size  # the same weights, stored once
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)


def test_pipeline_evaluates_w4_variants_on_int4_kernels_when_asked(tiny_model, tmp_path):
    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    dense = {r.name: r for r in load(pipeline.run(parse_spec(raw), progress=lambda _: None))}
    raw["evaluation"]["kernels"] = "int4"
    raw["output"]["dir"] = str(tmp_path / "out-int4")
    packed = {r.name: r for r in load(pipeline.run(parse_spec(raw), progress=lambda _: None))}
    assert "int4 tinygemm" in packed["rtn"].runtime and "decompressed" in dense["rtn"].runtime
    assert packed["baseline"].runtime == dense["baseline"].runtime  # the baseline has nothing to pack
    assert packed["rtn"].perplexity == pytest.approx(
        dense["rtn"].perplexity, rel=0.02
    )  # bf16 activations vs float32 on CPU
    assert [s["harness"] for s in packed["rtn"].speed] == ["static cache, eager"] * 2


def test_int4_kernels_refuse_an_8_bit_variant_before_any_work(tiny_model, tmp_path):
    raw = small_spec(
        tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "gptq", "bits": 8, "group_size": 32}]
    )
    raw["evaluation"]["kernels"] = "int4"
    with pytest.raises(QuantflowError, match="cannot run on the int4 kernels"):
        pipeline.plan(parse_spec(raw), progress=lambda _: None)


def load(out):
    from quantflow.reporting.report import load_report

    return load_report(out / "report.json").rows
