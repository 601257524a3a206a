"""FP4 weights (NVFP4, MXFP4) through llm-compressor's presets on a tiny Llama, evaluated by exact emulation beside
W4 INT at equal bits per weight."""

import pytest
import torch

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.quantization.quantize import resolve_group_size, weightless_model
from quantflow.reporting.report import load_report
from quantflow.spec import FP4Variant, parse_spec
from tests.conftest import make_model, small_spec

VARIANTS = [
    {"method": "rtn", "group_size": 32, "name": "int4-g32"},
    {"method": "nvfp4"},
    {"method": "mxfp4", "activations": "a4", "name": "mxfp4-a4"},
]


@pytest.fixture(scope="module")
def fp4_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp4")
    raw = small_spec(tiny_model, root / "out", root / "cache", VARIANTS, max_windows=2)
    raw["evaluation"]["speed"]["batch_sizes"] = [1]
    return pipeline.run(parse_spec(raw), progress=lambda _: None)


def test_fp4_variants_are_reported_beside_w4_int(fp4_run):
    report = load_report(fp4_run / "report.json")
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["baseline", "int4-g32", "nvfp4", "mxfp4-a4"] and not report.failed
    assert rows["nvfp4"].scheme.startswith("NVFP4 W4A16: FP4 E2M1 weights in groups of 16 with FP8 e4m3 scales")
    assert rows["mxfp4-a4"].scheme.startswith("MXFP4 W4A4: FP4 E2M1 weights in groups of 32 with E8M0 scales")
    # bits per weight from the files: 4 + an 8-bit scale per 16 (NVFP4) or per 32 (MXFP4); INT4 g32 + bf16 scale
    assert rows["nvfp4"].effective_bits == pytest.approx(4.5, abs=0.01)
    assert rows["mxfp4-a4"].effective_bits == pytest.approx(4.25, abs=0.01)
    assert rows["int4-g32"].effective_bits == pytest.approx(4.5, abs=0.01)
    for name in ("nvfp4", "mxfp4-a4"):
        assert rows[name].kl_mean > 0 and rows[name].quantized_layers == 14
        assert "FP4 weights dequantized at load (exact emulation" in rows[name].runtime
    assert rows["nvfp4"].speed and "not an FP4 kernel's speed" in rows["nvfp4"].runtime
    assert not rows["mxfp4-a4"].speed and "W4A4 not timed" in rows["mxfp4-a4"].runtime


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4-a4"])
def test_dequantized_weights_lie_on_the_fp4_grid(fp4_run, name):
    """Exact emulation: quantizing the loaded weights again with their own scales changes nothing beyond the bf16
    rounding of the dequantized weights (NVFP4's scales are not powers of two; MXFP4's are, and come back exact)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from quantflow.evaluation.evaluate import load_for_eval

    model, _ = load_for_eval(str(fp4_run / name), "cpu", "float32")
    layer = model.model.layers[1].mlp.down_proj
    args = layer.quantization_scheme.weights
    again = fake_quantize(
        layer.weight, layer.weight_scale, None, args, global_scale=getattr(layer, "weight_global_scale", None)
    )
    assert torch.allclose(again, layer.weight, rtol=2**-8, atol=0) and layer.weight.abs().sum() > 0
    assert torch.equal(again, layer.weight) or name == "nvfp4"


def test_fp4_group_must_divide_every_width(tmp_path):
    """Width 48: NVFP4's groups of 16 fit, MXFP4's 32 do not, and the error names the layers."""
    skeleton = weightless_model(str(make_model(tmp_path / "m", hidden=48)))
    assert resolve_group_size(skeleton, FP4Variant(name="nvfp4", method="nvfp4")).group_size == 16
    with pytest.raises(
        QuantflowError, match=r"multiples of 32; 12 layers are not: model.layers.0.self_attn.q_proj \(48\)"
    ):
        resolve_group_size(skeleton, FP4Variant(name="mxfp4", method="mxfp4"))


@pytest.fixture(scope="module")
def moe_nvfp4(tmp_path_factory):
    """NVFP4 W4A16 on the Qwen3-MoE shape: every expert with its own global scale."""
    from quantflow.infra.resources import Resources
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from tests.moe_models import make_moe

    model = make_moe(tmp_path_factory.mktemp("moe"))
    out = tmp_path_factory.mktemp("moe-nvfp4")
    quantize_weights(
        str(model),
        FP4Variant(name="nvfp4", method="nvfp4"),
        Scheme(group_size=16),
        None,
        Resources(device="cpu"),
        out,
        out,
    )
    return model, out


def expert_error(loaded, reference) -> float:
    got, want = loaded.model.layers[1].mlp.experts.down_proj.float(), reference.model.layers[1].mlp.experts.down_proj
    return ((got - want.float()).abs().mean() / want.float().abs().mean()).item()


def test_upstream_still_drops_expert_global_scales(moe_nvfp4):
    """transformers 5.17 dequantizes NVFP4 experts without their global scale, silently (huggingface/transformers
    #48371). When this test fails the fix has landed: the global-scale half of evaluation/expert_load.py can go."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, out = moe_nvfp4
    reference = AutoModelForCausalLM.from_pretrained(model)
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert expert_error(loaded, reference) > 100


def test_nvfp4_experts_load_with_their_global_scales(moe_nvfp4):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.evaluate import load_for_eval

    model, out = moe_nvfp4
    loaded, _ = load_for_eval(str(out), "cpu", "float32")
    assert 0 < expert_error(loaded, AutoModelForCausalLM.from_pretrained(model)) < 0.15  # FP4, groups of 16


def runtime_checks() -> dict:
    """In the child, under the interpreter: each FP4 artifact on the FP4 runtime against its dense emulation."""
    import json
    import os

    from quantflow.evaluation.evaluate import load_for_eval
    from quantflow.evaluation.fp4 import load_fp4
    from quantflow.evaluation.fuse import fuse_projections
    from quantflow.kernels.fp4 import FP4Linear

    results = {}
    for name, path in json.loads(os.environ["QF_FP4_ARTIFACTS"]).items():
        dense, _ = load_for_eval(path, "cpu", "bfloat16")
        kernel = load_fp4(path, "cpu")
        layers = [m for m in kernel.modules() if isinstance(m, FP4Linear)]
        ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for rows in (1, 20):  # one row: the decode kernel; 20: dequantized to bf16 for the matmul
                want, got = dense(ids[:, :rows]).logits.float(), kernel(ids[:, :rows]).logits.float()
                results[f"{name}-{rows}"] = {
                    "error": ((got - want).abs().max() / want.abs().max()).item(),
                    "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9),
                    "route": layers[0].route(rows, torch.device("cpu")),
                    "layers": len(layers),
                }
            unfused = kernel(ids[:, :1]).logits.float()
            fused = fuse_projections(kernel)  # q/k/v and gate/up as one FP4Linear each, as the decode harness times
            results[f"{name}-fused"] = {
                "groups": fused,
                "error": (kernel(ids[:, :1]).logits - unfused).abs().max().item(),
            }
    return results


def test_fp4_runtime_runs_the_stored_codes_on_the_kernel(fp4_run, moe_nvfp4, monkeypatch):
    """The FP4 runtime keeps every quantized Linear (dense and each expert) packed and gives the dense emulation's
    logits: the Triton kernel to 16 rows, the dequantized weight above."""
    import json

    from tests.conftest import run_interpreted

    pytest.importorskip("triton")
    artifacts = {"dense": str(fp4_run / "nvfp4"), "moe": str(moe_nvfp4[1])}
    monkeypatch.setenv("QF_FP4_ARTIFACTS", json.dumps(artifacts))
    results = run_interpreted("tests.unit.test_fp4", "runtime_checks")
    for name, layers in (("dense", 14), ("moe", None)):
        one, many = results[f"{name}-1"], results[f"{name}-20"]
        assert one["route"] == "FP4 Triton decode" and many["route"] == "FP4 dequantized to bf16 by Triton + cuBLAS"
        assert one["error"] < 0.02 and many["error"] < 0.02 and one["same_argmax"] and many["same_argmax"]
        assert layers is None or one["layers"] == layers
        assert results[f"{name}-fused"]["groups"] >= 2 and results[f"{name}-fused"]["error"] < 1e-2
    assert results["moe-1"]["layers"] > 14  # one module per expert and projection


def test_fp4_runtime_refuses_scales_it_cannot_read_with_one_clear_error(fp4_run, tmp_path):
    """An NVFP4 artifact whose scales were saved in another dtype (a scale_dtype override): the FP4 runtime stops
    with one error naming the dense runtime instead of reading the wrong bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantflow.evaluation.fp4 import load_fp4

    copy = tmp_path / "nvfp4-bf16-scales"
    shutil.copytree(fp4_run / "nvfp4", copy)
    tensors = load_file(copy / "model.safetensors")
    tensors = {k: v.to(torch.bfloat16) if k.endswith("weight_scale") else v for k, v in tensors.items()}
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantflowError, match="scales stored as torch.bfloat16") as error:
        load_fp4(copy, "cpu")
    assert "dense runtime" in error.value.fix
