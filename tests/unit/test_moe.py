"""Mixtures of experts on tiny random models: shape checks over every expert, routers in bf16, the asymmetric expert
load, routing counts, and a run whose variants all reach the report."""

import json

import pytest
import torch
from safetensors import safe_open

from quantflow.errors import QuantflowError
from quantflow.infra.resources import Resources
from quantflow.quantization.moe import counted_routing, routing_record, unfuse, with_routers
from quantflow.quantization.quantize import (
    Scheme,
    quantize_weights,
    resolve_group_size,
    target_layers,
    weightless_model,
)
from quantflow.spec import GPTQVariant, RTNVariant
from tests.moe_models import make_moe


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("qwen3-moe"), "qwen3_moe")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.mark.parametrize("family, layers", [("qwen3_moe", 2 * (4 + 8 * 3)), ("mixtral", 2 * (4 + 8 * 3))])
def test_shape_checks_see_every_expert(family, layers, qwen3_moe, mixtral):
    """The experts are fused 3-D tensors in transformers 5; the checks see them as llm-compressor will quantize
    them: one Linear per expert and projection, whose width 32 decides the group size."""
    skeleton = weightless_model(str({"qwen3_moe": qwen3_moe, "mixtral": mixtral}[family]))
    quantized, skipped = target_layers(skeleton, with_routers(["lm_head"]))
    assert len(quantized) == layers and skipped == ["lm_head"]
    assert "model.layers.1.mlp.experts.7.down_proj" in quantized
    assert resolve_group_size(skeleton, RTNVariant(name="rtn")).group_size == 32
    with pytest.raises(QuantflowError, match=r"experts\.0\.down_proj \(32\)"):
        resolve_group_size(skeleton, GPTQVariant(name="gptq", group_size=64))


def test_shared_expert_gate_stays_in_bf16(tmp_path):
    skeleton = weightless_model(str(make_moe(tmp_path, "qwen2_moe")))
    quantized, skipped = target_layers(skeleton, with_routers(["lm_head"]))
    assert skipped == ["model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate", "lm_head"]
    assert "model.layers.0.mlp.shared_expert.down_proj" in quantized


def test_floor_flags_rarely_routed_experts():
    record = routing_record({"layers.0": [300, 200, 99, 1]}, top_k=2)
    assert record.tokens == 300 and record.floor == 15
    assert [e.expert for e in record.flagged] == [3]
    assert record.experts[0].share == 0.5


@pytest.fixture(scope="module")
def asymmetric(qwen3_moe, tmp_path_factory):
    """RTN W4 asymmetric on the Qwen3-MoE shape (no calibration data): the layout AWQ writes."""
    out = tmp_path_factory.mktemp("rtn-asym")
    variant = RTNVariant(name="rtn", symmetric=False)
    record = quantize_weights(str(qwen3_moe), variant, Scheme(group_size=32), None, Resources(device="cpu"), out, out)
    return out, record


def test_artifact_has_per_expert_layout_and_bf16_routers(asymmetric):
    out, record = asymmetric
    assert len(record.quantized_layers) == 56 and "model.layers.0.mlp.gate" not in record.quantized_layers
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.mlp.gate.weight").dtype == torch.bfloat16
    for expert in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"model.layers.1.mlp.experts.{expert}.{proj}"
            assert {f"{prefix}.weight_packed", f"{prefix}.weight_scale", f"{prefix}.weight_zero_point"} <= keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_0"]["weights"]["symmetric"] is False


def test_upstream_still_drops_expert_zero_points(asymmetric):
    """transformers 5.17 loses the experts' zero points (huggingface/transformers#47430). When this test fails,
    the fix has landed: delete quantflow/evaluation/expert_load.py and its use in load_for_eval."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(asymmetric[0])


def test_asymmetric_experts_load_with_their_zero_points(asymmetric, qwen3_moe):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.expert_load import expert_load

    with expert_load():
        loaded = AutoModelForCausalLM.from_pretrained(asymmetric[0])
    reference = AutoModelForCausalLM.from_pretrained(qwen3_moe)
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(loaded.model.layers[1].mlp.experts, name).float()
        want = getattr(reference.model.layers[1].mlp.experts, name).float()
        error = ((got - want).abs().mean() / want.abs().mean()).item()
        assert 0 < error < 0.2, (name, error)  # W4 group 32 rounding; zero points dropped would be far off


def test_routing_counts_each_calibration_batch_once(qwen3_moe):
    """Two forward passes of the same batch (as the pipeline's propagation pass does) count once."""
    from llmcompressor.core import active_session
    from transformers import AutoModelForCausalLM

    model = unfuse(AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32))
    found = []
    tokens = torch.randint(3, 300, (1, 40))
    with counted_routing(model, found), torch.no_grad():
        for batch in (0, 0, 1):
            active_session().state.current_batch_idx = batch
            model(tokens)
    (record,) = found
    assert record.top_k == 2 and record.tokens == 80
    per_layer = {}
    for expert in record.experts:
        per_layer[expert.layer] = per_layer.get(expert.layer, 0) + expert.tokens
    assert per_layer == {"model.layers.0.mlp.experts": 160, "model.layers.1.mlp.experts": 160}


def test_experts_run_on_int4_kernels_one_per_expert(asymmetric):
    """The kernel runtimes build the per-expert layout too: every expert Linear becomes an int4 kernel module
    (PyTorch's CPU int4 kernel here), with the logits of transformers' dequantized load."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.expert_load import expert_load
    from quantflow.evaluation.int4 import Int4Linear, load_int4
    from quantflow.quantization.moe import expert_runtime

    packed = load_int4(asymmetric[0], "cpu")
    kernels = [n for n, m in packed.named_modules() if isinstance(m, Int4Linear)]
    assert len(kernels) == 56 and "model.layers.1.mlp.experts.5.up_proj" in kernels
    with expert_load():
        dense = AutoModelForCausalLM.from_pretrained(asymmetric[0], dtype=torch.bfloat16)
    ids = torch.randint(3, 300, (2, 16))
    logits, reference = packed(ids).logits.float(), dense(ids).logits.float()
    assert ((logits - reference).norm() / reference.norm()).item() < 0.02
    assert "one Int4Linear per expert" in expert_runtime(packed, 8)
    assert "fused bf16 tensors" in expert_runtime(dense, 8)


def test_unknown_fused_expert_layout_is_refused_at_plan_time(qwen3_moe):
    """Experts llm-compressor cannot unfuse would stay bf16 under a W4 label: one error naming method and type."""
    from quantflow.pipeline.planning import fit_shapes

    skeleton = weightless_model(str(qwen3_moe))
    with torch.device("meta"):
        custom = torch.nn.Module()
        custom.weight = torch.nn.Parameter(torch.empty(8, 32, 64))
    skeleton.model.layers[0].mlp.set_submodule("experts", custom)
    fitted = fit_shapes(skeleton, GPTQVariant(name="gptq"))
    assert fitted.scheme is None and fitted.problem.startswith(
        "variant 'gptq' (method gptq) cannot quantize the experts of this qwen3_moe model"
    )
    assert "model.layers.0.mlp.experts" in fitted.problem


def moe_spec(model, root, variants, **extra) -> dict:
    from tests.conftest import small_spec

    raw = small_spec(model, root / "out", root / "cache", variants, speed=None, max_windows=2, kl_tokens=32)
    return {**raw, **extra}


@pytest.fixture(scope="module")
def moe_run(qwen3_moe, tmp_path_factory):
    """RTN with zero points (the layout whose load failed) and GPTQ on the Qwen3-MoE shape, through the pipeline."""
    from quantflow import pipeline
    from quantflow.spec import parse_spec

    root = tmp_path_factory.mktemp("moe-run")
    variants = [{"method": "rtn", "symmetric": False}, {"method": "gptq"}]
    return root, pipeline.run(parse_spec(moe_spec(qwen3_moe, root, variants)), progress=lambda _: None)


def test_moe_variants_quantize_every_expert_and_report_routing(moe_run):
    from quantflow.reporting.report import load_report

    root, out = moe_run
    report = load_report(out / "report.json")
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["baseline", "rtn", "gptq"] and not report.failed
    for name in ("rtn", "gptq"):
        assert rows[name].quantized_layers == 56 and rows[name].skipped_layers == ["lm_head"]
        assert rows[name].kl_mean > 0 and "fused bf16 tensors" in rows[name].runtime
    assert rows["rtn"].size_ratio < rows["baseline"].size_ratio * 0.6  # the experts' bytes are counted
    assert rows["rtn"].routing is None  # RTN reads no calibration data: nothing was routed
    routing = rows["gptq"].routing
    assert routing.top_k == 2 and routing.tokens == report.calibration["tokens"]
    assert len(routing.experts) == 16 and sum(e.tokens for e in routing.experts) == 2 * 2 * routing.tokens
    markdown = (out / "report.md").read_text()
    assert "## Expert routing of the calibration tokens" in markdown and "model.layers.1.mlp.experts:" in markdown


def test_a_failed_variant_is_a_row_and_the_others_are_reported(moe_run, qwen3_moe):
    """A variant that fails (here: a step killed by its timeout) is a report row with its error; the variants that
    finished (cached from the first run) and the baseline are reported, and the run ends normally."""
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec

    root, _ = moe_run
    variants = [{"method": "rtn", "symmetric": False}, {"method": "awq", "n_grid": 4}, {"method": "gptq"}]
    spec = parse_spec(moe_spec(qwen3_moe, root, variants, step_timeout_s=1))
    report = load_report(pipeline.run(spec, progress=lambda _: None) / "report.json")
    assert [r.name for r in report.rows] == ["baseline", "rtn", "gptq"]
    (failed,) = report.failed
    assert failed.name == "awq" and failed.stage == "quantize"
    assert failed.error.startswith("method awq could not quantize this qwen3_moe model: step 'quantize' ran longer")
    assert "| awq | awq | failed at quantize |" in (root / "out" / "report.md").read_text()


def test_int8_experts_load(qwen3_moe, tmp_path):
    """INT8 W8A8 experts are stored as plain int8 weights, which transformers 5.17's expert loader does not look
    for (the load stops with "Concatenate ... Ckpt contains: 0"); evaluation/expert_load.py dequantizes them."""
    from quantflow.evaluation.evaluate import load_for_eval
    from quantflow.inputs.calibration import build_calibration
    from quantflow.spec import CalibrationSpec, EvaluationSpec, Int8Variant

    calibration = build_calibration(
        CalibrationSpec(num_samples=4, seq_len=32), EvaluationSpec(), str(qwen3_moe), tmp_path, tmp_path
    )
    out = tmp_path / "int8"
    out.mkdir()
    record = quantize_weights(
        str(qwen3_moe),
        Int8Variant(name="int8"),
        Scheme(group_size=None),
        calibration,
        Resources(device="cpu"),
        out,
        out,
    )
    assert len(record.quantized_layers) == 56 and record.routing.top_k == 2
    model, _ = load_for_eval(str(out), "cpu", "float32")
    assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


def test_the_direct_measure_scores_every_expert_from_the_uniform_gptq_pass(qwen3_moe, tmp_path):
    """The direct measure's uniform pass quantizes each expert as its own group and moves each alone; routers stay out."""
    from quantflow.pipeline import steps
    from quantflow.pipeline.planning import plan
    from quantflow.spec import parse_spec

    variant = {"method": "mixed", "group_size": 32, "sensitivity": "direct", "sensitivity_tokens": 32}
    planned = plan(parse_spec(moe_spec(qwen3_moe, tmp_path, [variant])), lambda _: None)
    (mixed,) = planned.variants
    measured = steps.measure(planned, mixed, steps.calibrate(planned, isolate=False).record, isolate=False)
    table = json.loads(open(measured.record.path).read())
    experts = [g for g in table["groups"] if ".experts." in g["name"]]
    assert table["measure"] == "direct" and table["start"]["pass"] == "uniform gptq"
    assert len(experts) == 2 * 8 * 2  # 2 blocks x 8 experts x (gate/up, down)
    assert not any("gate" == g["name"].rsplit(".", 1)[-1] for g in table["groups"])  # routers stay bf16
    assert sum(g["score"]["w4"] for g in experts) > 0
