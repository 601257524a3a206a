"""The recipe space beyond W4A16: FP8 and INT8 W8A8, W8A16, AWQ+GPTQ and AutoRound, end to end on a tiny model;
the FP8 runtime against the dequantized reference; the plan-time refusals."""

import pytest
import torch
from safetensors import safe_open

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.reporting.report import load_report
from quantflow.spec import parse_spec
from tests.conftest import make_model, read_json, small_spec

VARIANTS = [
    {"method": "fp8"},
    {"method": "fp8", "algorithm": "gptq", "name": "fp8-gptq"},
    {"method": "int8"},
    {"method": "gptq", "bits": 8, "group_size": None, "name": "gptq-w8"},
    {"method": "awq-gptq", "group_size": 32, "n_grid": 4},
    {"method": "autoround", "group_size": 32, "iters": 4},
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    model = make_model(root / "model")  # 64 wide: q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128
    raw = small_spec(model, root / "out", root / "cache", VARIANTS)
    raw["evaluation"]["speed"]["batch_sizes"] = [1]
    return pipeline.run(parse_spec(raw), progress=lambda _: None)


def scheme(folder) -> dict:
    return next(iter(read_json(folder / "config.json")["quantization_config"]["config_groups"].values()))


def test_each_recipe_writes_its_compressed_tensors_scheme(finished):
    fp8, int8, w8 = scheme(finished / "fp8"), scheme(finished / "int8"), scheme(finished / "gptq-w8")
    assert (fp8["weights"]["type"], fp8["weights"]["strategy"], fp8["input_activations"]["strategy"]) == (
        "float",
        "channel",
        "token",
    )
    assert fp8["input_activations"]["dynamic"] is True and fp8["format"] == "float-quantized"
    assert (int8["weights"]["type"], int8["weights"]["num_bits"], int8["input_activations"]["type"]) == (
        "int",
        8,
        "int",
    )
    assert w8["weights"]["num_bits"] == 8 and w8["input_activations"] is None  # W8A16
    fp8_gptq = scheme(finished / "fp8-gptq")  # GPTQ changes the rounding and records its column order, no more
    assert fp8_gptq["weights"].pop("actorder") == "static" and fp8["weights"].pop("actorder") is None
    assert fp8_gptq == fp8
    assert "GPTQModifier" in (finished / "fp8-gptq" / "recipe.yaml").read_text()
    rtn_weight, gptq_weight = (
        safe_open(finished / name / "model.safetensors", "pt").get_tensor("model.layers.1.mlp.down_proj.weight")
        for name in ("fp8", "fp8-gptq")
    )
    assert rtn_weight.dtype == gptq_weight.dtype == torch.float8_e4m3fn
    assert (rtn_weight.view(torch.uint8) != gptq_weight.view(torch.uint8)).float().mean() > 0.05
    for name in ("awq-gptq", "autoround"):
        weights = scheme(finished / name)["weights"]
        assert (weights["num_bits"], weights["group_size"]) == (4, 32)
    recipe = (finished / "awq-gptq" / "recipe.yaml").read_text()
    assert "AWQModifier" in recipe and "GPTQModifier" in recipe
    assert "SmoothQuantModifier" in (finished / "int8" / "recipe.yaml").read_text()
    assert "AutoRoundModifier" in (finished / "autoround" / "recipe.yaml").read_text()


def test_report_rows_name_the_scheme_bits_and_smoothing(finished):
    report = load_report(finished / "report.json")
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {"baseline", "fp8", "fp8-gptq", "int8", "gptq-w8", "awq-gptq", "autoround"}
    assert "GPTQ-rounded" in rows["fp8-gptq"].scheme and "GPTQ-rounded" not in rows["fp8"].scheme
    # per-channel 8-bit: 8 bits plus one 16-bit scale per output row, 512 rows per block's 36,864 weights;
    # W4 g32 asym: 4 + 16/32 + 4/32
    assert rows["fp8"].effective_bits == rows["int8"].effective_bits == rows["gptq-w8"].effective_bits == 8.222
    assert rows["awq-gptq"].effective_bits == 4.625 and rows["autoround"].effective_bits == 4.5
    assert rows["fp8"].scheme.startswith("W8A8 FP8") and rows["gptq-w8"].scheme.startswith("W8A16")
    assert "simulated W8A8" in rows["int8"].runtime and "simulated W8A8" in rows["fp8"].runtime
    assert all(abs(r.ppl_delta_pct) < 5 for r in rows.values())  # a random model's output barely moves at 8 bits
    smoothing = rows["awq-gptq"].smoothing
    assert len(smoothing.mappings) == 3 * 2  # norm -> qkv, norm -> gate/up, up -> down, in each of two blocks
    assert sorted(smoothing.unsmoothed) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert rows["fp8"].smoothing is None
    markdown = (finished / "report.md").read_text()
    assert "input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj (2 blocks)" in markdown
    assert "not smoothed: self_attn.o_proj x 2" in markdown
    assert "W8A8 FP8" in (finished / "fp8" / "README.md").read_text()
    assert set(report.pareto_speed) <= set(rows) and report.pareto_speed
    assert (finished / "quality_vs_speed.png").stat().st_size > 1000


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def test_fp8_matmuls_match_the_dequantized_reference(finished):
    """PyTorch's CPU _scaled_mm stands in for Hopper's here: the same layer maths. Each layer is checked against
    transformers' dequantized weights times activations rounded to e4m3 with fp32 per-token scales (vLLM's dynamic
    FP8). compressed-tensors' own simulation rounds through bf16, which moves a layer's output by about as much
    as FP8 itself (3.7% here), so against it only the whole model's distance from the baseline is compared."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.fp8 import load_fp8
    from quantflow.evaluation.fuse import fuse_projections
    from quantflow.kernels.fp8 import E4M3, E4M3_MAX, FP8GatedMLP, FP8Linear

    simulated = AutoModelForCausalLM.from_pretrained(finished / "fp8", dtype=torch.bfloat16)
    baseline = AutoModelForCausalLM.from_pretrained(finished.parent / "model", dtype=torch.bfloat16)
    fp8 = load_fp8(finished / "fp8", "cpu")
    ids = torch.randint(0, 300, (2, 16))
    reference, logits = baseline(ids).logits, fp8(ids).logits  # the first call also decompresses `simulated`
    assert relative(logits, reference) < 1.25 * relative(simulated(ids).logits, reference)
    layers = {n: m for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    assert len(layers) == 14 and layers["model.layers.0.mlp.up_proj"].weight.dtype == E4M3
    for name, layer in layers.items():
        x = torch.randn(5, layer.in_features, dtype=torch.bfloat16)
        scale = x.float().abs().amax(-1, keepdim=True) / E4M3_MAX
        expected = ((x.float() / scale).to(E4M3).float() * scale) @ simulated.get_submodule(name).weight.float().t()
        assert relative(layer(x), expected) < 0.01, name  # bf16 output and scales: ~0.2% expected
    assert fuse_projections(fp8) == 4  # q/k/v and gate/up of two blocks, each joined as one FP8 layer
    assert sum(isinstance(m, FP8GatedMLP) for m in fp8.modules()) == 2  # each block's MLP: on CPU, its Linears' path
    assert relative(fp8(ids).logits, logits) < 1e-3


@torch.no_grad()
@pytest.mark.parametrize(("name", "kind"), [("int8", "w8a8"), ("gptq-w8", "w8a16")])
def test_int8_kernels_match_the_dequantized_reference(finished, name, kind):
    """PyTorch's CPU int8 ops stand in for CUDA's (the runtime picks them on CUDA only; on CPU the row is dense)."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.fuse import fuse_projections
    from quantflow.evaluation.int8 import load_int8, use_int8
    from quantflow.kernels.int8 import Int8Linear, Int8WeightOnlyLinear

    assert use_int8(finished / name, "auto", "cuda") and not use_int8(finished / name, "auto", "cpu")
    model, found = load_int8(finished / name, "cpu")  # load checks one layer against its dequantized weights
    layer_type = Int8Linear if kind == "w8a8" else Int8WeightOnlyLinear
    layers = {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}
    assert found == kind and len(layers) == 14
    dense = AutoModelForCausalLM.from_pretrained(finished / name, dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (2, 16))
    dense(ids)  # decompresses `dense`
    for layer_name, layer in layers.items():
        weight = dense.get_submodule(layer_name).weight.float()
        assert relative(layer.dequantized(), weight) < 0.01, layer_name  # the same weights transformers loads
    logits = model(ids).logits
    assert fuse_projections(model) == 4
    assert relative(model(ids).logits, logits) < 1e-2


def test_plan_refuses_what_the_machine_or_model_cannot_run(tmp_path):
    model = make_model(tmp_path / "model")

    def plan(variants, **evaluation):
        spec = parse_spec(small_spec(model, tmp_path / "out", tmp_path / "cache", variants, **evaluation))
        return pipeline.plan(spec, progress=lambda _: None)

    with pytest.raises(QuantflowError, match="needs FP8 matmuls.*on CPU") as error:
        plan([{"method": "fp8"}], kernels="fp8")
    assert "compute capability 8.9" in error.value.fix
    with pytest.raises(QuantflowError, match="cannot run on FP8 matmuls"):
        plan([{"method": "int8"}, {"method": "fp8"}], kernels="fp8")
    with pytest.raises(QuantflowError, match="needs quantflow's FP4 kernel.*on CPU") as error:
        plan([{"method": "nvfp4"}], kernels="fp4")
    assert "compute capability 8.0" in error.value.fix
    with pytest.raises(QuantflowError, match="cannot run on the int4 kernels"):
        plan([{"method": "fp8"}], kernels="int4")
    with pytest.raises(QuantflowError, match="unknown variant method 'fp9'"):
        from quantflow.spec import variant_for

        variant_for("fp9")
    assert not (tmp_path / "out").exists()


def test_autoround_calibrates_when_the_calibration_batch_is_larger_than_its_own(tmp_path):
    """On a GPU the calibration batch defaults to 16, above AutoRound's 8; AutoRound batches the captured samples
    itself and exits the process when a captured input is already a batch wider than its own."""
    model = make_model(tmp_path / "model")
    variants = [{"method": "autoround", "group_size": 32, "iters": 2, "batch_size": 2}]
    raw = small_spec(model, tmp_path / "out", tmp_path / "cache", variants)
    raw["calibration_batch_size"] = 8
    raw["evaluation"]["speed"]["batch_sizes"] = [1]
    rows = {r.name: r for r in load_report(pipeline.run(parse_spec(raw), progress=lambda _: None) / "report.json").rows}
    assert rows["autoround"].kl_mean > 0 and rows["autoround"].effective_bits == 4.5


def test_scheme_names_how_the_integer_scales_were_chosen():
    """Two GPTQ rows that differ only in their observer differ by several points of perplexity (docs/recipes.md): the
    report's scheme column must tell them apart; AutoRound learns its own clipping, so no observer is named."""
    from quantflow.quantization.quantize import scheme_label
    from quantflow.spec import AutoRoundVariant, AWQVariant, GPTQVariant

    assert scheme_label(GPTQVariant(name="g"), 128) == "W4A16 int, symmetric, group 128"
    assert (
        scheme_label(GPTQVariant(name="g", observer="mse"), 128)
        == "W4A16 int, symmetric, group 128, MSE-clipped scales"
    )
    assert scheme_label(AWQVariant(name="a"), None).endswith("per-channel, activation-weighted MSE-clipped scales")
    assert scheme_label(AutoRoundVariant(name="x", observer="mse"), 64) == "W4A16 int, symmetric, group 64"
