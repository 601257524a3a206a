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
    """RTN with zero points (the layout whose load failed), GPTQ, mixed precision (a budget that buys some W8 or bf16)
    and bitsandbytes on the Qwen3-MoE shape, through the pipeline."""
    from quantflow import pipeline
    from quantflow.spec import parse_spec

    root = tmp_path_factory.mktemp("moe-run")
    mixed = {"method": "mixed", "target_bits": 6.0, "sensitivity_tokens": 256}
    variants = [{"method": "rtn", "symmetric": False}, {"method": "gptq"}, mixed, {"method": "bnb-nf4"}]
    return root, pipeline.run(parse_spec(moe_spec(qwen3_moe, root, variants)), progress=lambda _: None)


def test_moe_variants_quantize_every_expert_and_report_routing(moe_run):
    from quantflow.reporting.report import load_report

    root, out = moe_run
    report = load_report(out / "report.json")
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["baseline", "rtn", "gptq", "mixed", "bnb-nf4"] and not report.failed
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


def test_mixed_precision_allocates_per_expert_and_maps_them(moe_run):
    """Every expert Linear is a layer of the allocation: the precision record names each one, the artifact loads
    (KL measured) and the precision map beside the report has a column per expert."""
    import matplotlib.image

    from quantflow.reporting.report import load_report

    _, out = moe_run
    row = next(r for r in load_report(out / "report.json").rows if r.name == "mixed")
    experts = [name for name in row.precision if ".mlp.experts." in name]
    assert len(row.precision) == 56 and len(experts) == 48 and row.kl_mean > 0
    assert row.allocated_bits <= 6.0 and row.routing.top_k == 2
    assert matplotlib.image.imread(out / "precision-mixed.png").shape[1] > 2000  # 28 columns, not 7


def test_bitsandbytes_leaves_experts_in_bf16_and_the_row_says_so(moe_run, qwen3_moe):
    """bitsandbytes replaces nn.Linear modules; transformers 5's fused experts are not Linears. The loaded experts
    are the checkpoint's bf16 values exactly, the row's runtime says so, and its bits per weight count the
    experts and routers at 16 (61,952 Linear weights, 49,664 of them experts and routers: 13.645, not nf4's 4.127).
    On CPU the unquantized tensors load in the float32 compute dtype: compared as floats, they are the checkpoint's."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.runtime import Subject, load_on_runtime
    from quantflow.reporting.report import load_report
    from quantflow.spec import BnbVariant

    _, out = moe_run
    row = next(r for r in load_report(out / "report.json").rows if r.name == "bnb-nf4")
    assert "bitsandbytes quantizes Linear layers only, so the fused experts stay bf16" in row.runtime
    assert row.effective_bits == pytest.approx(13.645)
    subject = Subject(name="bnb-nf4", model_path=str(qwen3_moe), bnb=BnbVariant(method="bnb-nf4"))
    model = load_on_runtime(subject, "auto", Resources(device="cpu"))[0]
    reference = AutoModelForCausalLM.from_pretrained(qwen3_moe)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(model.model.layers[1].mlp.experts, name)  # unquantized, in the CPU's float32 compute dtype
        assert torch.equal(got.float(), getattr(reference.model.layers[1].mlp.experts, name).float())


def test_a_failed_variant_is_a_row_and_the_others_are_reported(moe_run, qwen3_moe):
    """A variant that fails (here: a step killed by its timeout) is a report row with its error; the variants that
    finished (cached from the first run) and the baseline are reported, and the run ends normally."""
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec

    root, _ = moe_run
    variants = [{"method": "rtn", "symmetric": False}, {"method": "awq", "n_grid": 4}, {"method": "gptq"}]
    spec = parse_spec(moe_spec(qwen3_moe, root, variants, step_timeout_s=0.05))  # awq cannot finish in 50 ms
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


@pytest.fixture(scope="module")
def mixed_experts(qwen3_moe, tmp_path_factory):
    """A mixed-precision artifact whose experts differ: layer 0's expert 0 kept in bf16, expert 1's down projection
    W8, every other Linear W4 (the allocation is fixed here so that each kind of expert is there to load)."""
    from quantflow.inputs.calibration import build_calibration
    from quantflow.quantization import quantize
    from quantflow.spec import CalibrationSpec, EvaluationSpec, MixedVariant

    names = target_layers(weightless_model(str(qwen3_moe)), with_routers(["lm_head"]))[0]
    precision = {name: "w4" for name in names}
    precision |= {f"model.layers.0.mlp.experts.0.{p}": "bf16" for p in ("gate_proj", "up_proj", "down_proj")}
    precision["model.layers.0.mlp.experts.1.down_proj"] = "w8"
    root = tmp_path_factory.mktemp("mixed-experts")
    data = build_calibration(CalibrationSpec(num_samples=4, seq_len=32), EvaluationSpec(), str(qwen3_moe), root, root)
    out = root / "mixed"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "allocation", lambda variant, sensitivity: (precision, 5.0))
        record = quantize.quantize_weights(
            str(qwen3_moe), MixedVariant(name="mixed"), Scheme(group_size=32), data, Resources(device="cpu"), out, out
        )
    return out, record


def test_mixed_precision_experts_load_each_with_its_own_scheme(mixed_experts, qwen3_moe):
    """transformers 5.17 decompresses every expert with one scheme; a mixed artifact's experts have several (the
    load stopped: "The size of tensor a (32) must match the size of tensor b (2)"). Each expert now loads with its
    own: the bf16 expert exact, the W8 one close, the W4 ones at W4's error."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.evaluate import load_for_eval

    out, record = mixed_experts
    assert len(record.quantized_layers) == 53 and record.precision["model.layers.0.mlp.experts.0.up_proj"] == "bf16"
    loaded, _ = load_for_eval(str(out), "cpu", "float32")
    reference = AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32)

    def error(name: str, expert: int) -> float:
        got = getattr(loaded.model.layers[0].mlp.experts, name)[expert].float()
        want = getattr(reference.model.layers[0].mlp.experts, name)[expert].float()
        return ((got - want).abs().mean() / want.abs().mean()).item()

    assert error("gate_up_proj", 0) == 0 and error("down_proj", 0) == 0
    assert 0 < error("down_proj", 1) < 0.02 and 0.05 < error("gate_up_proj", 1) < 0.2
    assert 0.05 < error("down_proj", 2) < 0.2
    assert torch.isfinite(loaded(torch.randint(3, 300, (1, 8))).logits).all()


def test_upstream_still_gives_every_expert_one_scheme(mixed_experts, qwen3_moe):
    """transformers 5.17 decompresses all experts with the first expert group's scheme and never collects a bf16
    expert's plain weight: here layer 0's bf16 expert comes back far off (no error). When this test fails, the
    fix has landed and ``expert_schemes`` in evaluation/expert_load.py can go."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=True)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(mixed_experts[0], quantization_config=config)
    except RuntimeError as error:
        assert "conversion of the weights" in str(error)
        return
    got = loaded.model.layers[0].mlp.experts.down_proj[0].float()
    want = AutoModelForCausalLM.from_pretrained(qwen3_moe).model.layers[0].mlp.experts.down_proj[0].float()
    assert ((got - want).abs().mean() / want.abs().mean()).item() > 0.5


def test_precision_map_gives_each_expert_a_column(mixed_experts, tmp_path):
    """The allocation treats every expert as a layer; the map shows each (the projection kind alone merged a
    layer's experts into one cell, the last expert's option)."""
    import matplotlib.image

    from quantflow.quantization.mixed import map_cell
    from quantflow.reporting.report import precision_map

    precision = mixed_experts[1].precision
    assert map_cell("model.layers.0.mlp.experts.1.down_proj") == (0, "experts.1.down_proj")
    assert map_cell("model.layers.0.self_attn.q_proj") == (0, "q_proj") and map_cell("lm_head") == (None, "lm_head")
    columns = {map_cell(name) for name in precision}
    assert len(columns) == len(precision) == 56
    precision_map(precision, "mixed", tmp_path / "map.png")
    wide = matplotlib.image.imread(tmp_path / "map.png").shape[1]
    dense = {name: option for name, option in precision.items() if ".experts." not in name}
    precision_map(dense, "mixed", tmp_path / "dense.png")
    assert wide > 4 * matplotlib.image.imread(tmp_path / "dense.png").shape[1]


@pytest.mark.slow  # minutes on a 2-core CPU (337 s loaded): a uniform GPTQ pass, then a forward per expert
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
