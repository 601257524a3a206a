"""The decode harness on CUDA: a second process of the same shape family loads the first one's compiled step, a model
of other layer classes compiles its own (GPU machines only)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def time_decode(model_dir: str, cache_dir: str, int4: bool) -> str:
    """In a fresh process, as each variant's evaluation runs: the decode harness's label."""
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.decode import benchmark
    from quantflow.evaluation.int4 import load_int4
    from quantflow.spec import SpeedSpec

    if int4:
        model = load_int4(model_dir, "cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    speed = SpeedSpec(batch_sizes=[1], prompt_len=8, gen_len=4, warmup=0, repeats=1)
    return benchmark(model, "x", 1, speed).harness


def test_a_later_variant_loads_the_compiled_step_and_another_family_compiles_its_own(tmp_path):
    from quantflow.infra.resources import Resources
    from quantflow.infra.steps import isolated
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from quantflow.spec import RTNVariant
    from tests.conftest import make_model

    model = make_model(tmp_path / "model", hidden=256)
    rtn = tmp_path / "rtn"
    variant = RTNVariant(name="rtn", group_size=64)
    quantize_weights(str(model), variant, Scheme(group_size=64), None, Resources(device="cuda"), rtn, rtn)
    cache = str(tmp_path / "inductor")

    def label(folder, int4: bool) -> str:
        return isolated("decode", None, time_decode, str(folder), cache, int4)

    assert "compiled and saved" in label(rtn, True)
    assert "whole step, loaded" in label(rtn, True)
    assert "compiled and saved" in label(model, False)  # dense Linears: another family
    assert len(list((tmp_path / "inductor" / "quantflow-steps").glob("*.step"))) == 2
