"""The CUDA int4 kernel on saved artifacts: numerically the dequantized reference (GPU machines only)."""

import itertools

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_cuda_int4_matches_dequantized_reference(tmp_path, symmetric, group_size):
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.int4 import load_int4, pack_all
    from quantflow.infra.resources import Resources
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from quantflow.spec import RTNVariant
    from tests.conftest import make_model

    model = make_model(tmp_path / "model", hidden=256)
    out = tmp_path / "rtn"
    quantize_weights(
        str(model),
        RTNVariant(name="rtn", group_size=group_size, symmetric=symmetric),
        Scheme(group_size=group_size),
        None,
        Resources(device="cuda"),
        out,
        out,
    )
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda()  # transformers' dequantized weights
    packed = pack_all(load_int4(out, "cuda"))
    dense(torch.tensor([[1, 2, 3]], device="cuda"))  # transformers decompresses on the first forward
    for (name, width), rows in itertools.product(
        (("model.layers.0.self_attn.q_proj", 256), ("model.layers.1.mlp.down_proj", 512)), (1, 3, 8, 16)
    ):
        inputs = torch.randn(
            rows, width, device="cuda"
        )  # tinygemm tiles rows by 16: 1, 3, 8 and 16 rows take different paths
        reference = inputs @ dense.get_submodule(name).weight.float().t()
        error = ((packed.get_submodule(name)(inputs).float() - reference).norm() / reference.norm()).item()
        assert error < 0.01, (name, rows, error)
