"""A second mixture-of-experts family, Mixtral, through every method: artifacts in the per-expert layout vLLM loads
for that family (``block_sparse_moe.experts.E.w1``), loaded back by transformers with each expert close to its
original. Shapes are the smallest that keep every width a multiple of 32: 2 layers, 4 experts, hidden 32."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from quantflow.infra.resources import Resources
from quantflow.spec import (
    AutoRoundVariant,
    AWQGPTQVariant,
    AWQVariant,
    FP4Variant,
    FP8Variant,
    GPTQVariant,
    Int8Variant,
    RTNVariant,
)
from tests.moe_models import make_moe

VARIANTS = {  # variant -> the largest mean relative error of a loaded expert weight its scheme allows
    "rtn-sym": (RTNVariant(name="rtn-sym"), 0.2),
    "rtn-asym": (RTNVariant(name="rtn-asym", symmetric=False), 0.2),
    "w8a16": (RTNVariant(name="w8a16", bits=8), 0.02),
    "gptq-sym": (GPTQVariant(name="gptq-sym"), 0.25),
    "gptq-asym": (GPTQVariant(name="gptq-asym", symmetric=False), 0.25),
    "awq-sym": (AWQVariant(name="awq-sym", symmetric=True, n_grid=3), 0.25),
    "awq-asym": (AWQVariant(name="awq-asym", n_grid=3), 0.25),
    "awq-gptq": (AWQGPTQVariant(name="awq-gptq", n_grid=3), 0.25),
    "autoround": (AutoRoundVariant(name="autoround", iters=2, batch_size=2), 0.25),
    "fp8": (FP8Variant(name="fp8"), 0.05),
    "int8": (Int8Variant(name="int8"), 0.02),
    "nvfp4": (FP4Variant(name="nvfp4", method="nvfp4"), 0.2),
    "mxfp4": (FP4Variant(name="mxfp4", method="mxfp4"), 0.2),
}
# Each load path (zero points, FP8, INT8 plain weights, NVFP4 global scales, MXFP4) runs in the suite; the methods
# that write one of those same layouts more slowly (AWQ and AutoRound: 20-45 s each on 2 loaded cores) are `slow`.
SUITE = ("rtn-asym", "gptq-asym", "fp8", "int8", "nvfp4", "mxfp4")
VLLM_NAMES = ("w1", "w2", "w3")  # vLLM's Mixtral: make_expert_params_mapping(gate "w1", down "w2", up "w3")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("mixtral"), "mixtral", hidden=32, experts=4)


@pytest.fixture(scope="module")
def calibration(mixtral, tmp_path_factory):
    from quantflow.inputs.calibration import build_calibration
    from quantflow.spec import CalibrationSpec, EvaluationSpec

    root = tmp_path_factory.mktemp("calibration")
    return build_calibration(CalibrationSpec(num_samples=4, seq_len=32), EvaluationSpec(), str(mixtral), root, root)


@pytest.mark.parametrize(
    "name", [name if name in SUITE else pytest.param(name, marks=pytest.mark.slow) for name in VARIANTS]
)
def test_every_method_writes_mixtral_experts_vllm_loads(name, mixtral, calibration, tmp_path):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.evaluate import load_for_eval
    from quantflow.pipeline.planning import fit_shapes
    from quantflow.quantization.quantize import needs_calibration, quantize_weights, weightless_model

    variant, bound = VARIANTS[name]
    scheme = fit_shapes(weightless_model(str(mixtral)), variant).scheme
    data = calibration if needs_calibration(variant) else None
    record = quantize_weights(str(mixtral), variant, scheme, data, Resources(device="cpu"), tmp_path, tmp_path)
    assert len(record.quantized_layers) == 2 * (4 + 4 * 3) and "model.layers.0.mlp.gate" not in record.quantized_layers
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    stored = "weight_packed" if any(k.endswith("weight_packed") for k in keys) else "weight"
    for expert in range(4):
        for proj in VLLM_NAMES:
            assert f"model.layers.1.block_sparse_moe.experts.{expert}.{proj}.{stored}" in keys
            assert f"model.layers.1.block_sparse_moe.experts.{expert}.{proj}.weight_scale" in keys
    assert not any("_proj" in k and ".experts." in k for k in keys)
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys  # the router, in bf16
    loaded, _ = load_for_eval(str(tmp_path), "cpu", "float32")
    reference = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    for proj in ("gate_up_proj", "down_proj"):
        got = getattr(loaded.model.layers[1].mlp.experts, proj)
        want = getattr(reference.model.layers[1].mlp.experts, proj)
        error = ((got - want).abs().mean() / want.abs().mean()).item()
        assert 0 < error < bound, (proj, error)
    assert torch.isfinite(loaded(torch.randint(3, 300, (1, 8))).logits).all()


def test_upstream_still_saves_mixtral_experts_under_linear_names(mixtral, tmp_path):
    """llm-compressor 0.14 saves unfused Mixtral experts as ``block_sparse_moe.experts.E.gate_proj``, names neither
    vLLM nor transformers loads. When this test fails the fix has landed: ``checkpoint_expert_names`` in
    evaluation/expert_load.py can go."""
    from transformers import AutoModelForCausalLM

    from quantflow.quantization.moe import unfuse

    unfuse(AutoModelForCausalLM.from_pretrained(mixtral)).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight" in set(handle.keys())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"


def test_mixtral_experts_run_on_int4_kernels(mixtral, tmp_path):
    """The kernel runtimes build transformers' module names (``mlp.experts.E.gate_proj``) from Mixtral's stored ones
    (``block_sparse_moe.experts.E.w1``): every expert Linear becomes an int4 kernel module (PyTorch's CPU int4
    kernel here) with the logits of transformers' dequantized load."""
    from quantflow.evaluation.evaluate import load_for_eval
    from quantflow.evaluation.int4 import Int4Linear, load_int4
    from quantflow.quantization.quantize import Scheme, quantize_weights

    variant = RTNVariant(name="rtn", symmetric=False)
    quantize_weights(str(mixtral), variant, Scheme(group_size=32), None, Resources(device="cpu"), tmp_path, tmp_path)
    packed = load_int4(tmp_path, "cpu")
    kernels = [n for n, m in packed.named_modules() if isinstance(m, Int4Linear)]
    assert len(kernels) == 32 and "model.layers.1.mlp.experts.3.up_proj" in kernels
    dense, _ = load_for_eval(str(tmp_path), "cpu", "bfloat16")
    ids = torch.randint(3, 300, (2, 16))
    logits, reference = packed(ids).logits.float(), dense(ids).logits.float()
    assert ((logits - reference).norm() / reference.norm()).item() < 0.02
