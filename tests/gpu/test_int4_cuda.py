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


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(11008, 4096), (4096, 11008), (256, 2048)])
def test_int4_layer_matches_dense_at_real_shapes(shape, group_size):
    """Real 7B and 1.1B layer shapes (down, up and k/v projections) against the dense weight they encode."""
    from quantflow.evaluation.int4 import Int4Linear

    out_features, in_features = shape
    torch.manual_seed(0)
    unsigned = torch.randint(0, 16, shape, dtype=torch.int32)
    scale = torch.rand(out_features, in_features // group_size) * 0.02 + 0.001
    zero = torch.randn(out_features, in_features // group_size) * 0.01
    plain = Int4Linear.from_unsigned(unsigned, scale, zero, group_size, None, torch.device("cuda"))
    packed = Int4Linear.from_unsigned(unsigned, scale, zero, group_size, None, torch.device("cuda")).pack()
    reference_weight = (
        (unsigned - 8) * scale.repeat_interleave(group_size, 1) + zero.repeat_interleave(group_size, 1)
    ).cuda()
    for (form, layer), rows in itertools.product((("plain", plain), ("packed", packed)), (1, 2, 8, 2048)):
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ reference_weight.t()
        error = ((layer(x).float() - reference).norm() / reference.norm()).item()
        assert error < 0.01, (form, rows, error)


@pytest.mark.parametrize("group_size", [32, 128])
def test_concatenated_int4_layers_compute_each_part(group_size):
    """quantflow.evaluation.fuse stacks tinygemm's packed tiles along the output: q (2048), k and v (256 each) of the
    1.1B shape."""
    from quantflow.evaluation.int4 import Int4Linear

    torch.manual_seed(0)
    parts = []
    for out_features in (2048, 256, 256):
        unsigned = torch.randint(0, 16, (out_features, 2048), dtype=torch.int32)
        scale, zero = (
            torch.rand(out_features, 2048 // group_size) * 0.02 + 0.001,
            torch.randn(out_features, 2048 // group_size) * 0.01,
        )
        parts.append(
            Int4Linear.from_unsigned(unsigned, scale, zero, group_size, torch.randn(out_features), torch.device("cuda"))
        )  # plain: concat packs them
    joined = Int4Linear.concat(parts, torch.cat([part.bias for part in parts]))
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(joined(x), torch.cat([part(x) for part in parts], dim=-1), rtol=0.01, atol=0.01)
