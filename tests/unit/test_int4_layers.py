"""Int4Linear at real layer shapes against the dense weight it encodes, on the CPU's int4 kernel (always, in CI) and
on tinygemm's CUDA kernel where a GPU is present. The CPU runs few rows to stay fast; the GPU also a 2048-row prefill.
"""

import itertools

import pytest
import torch

from quantflow.evaluation.int4 import Int4Linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROWS = {"cpu": (1, 2, 8, 17), "cuda": (1, 2, 8, 2048)}  # tinygemm tiles rows by 16: 1, 8 and 17 take other paths


def random_layer(out_features: int, in_features: int, group_size: int):
    unsigned = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    scale = torch.rand(out_features, in_features // group_size) * 0.02 + 0.001
    zero = torch.randn(out_features, in_features // group_size) * 0.01
    return unsigned, scale, zero


# 1.1B k/v at every group size, its MLP and the 7B MLP at one each on the CPU (seconds), everything on the GPU
SHAPES = [((256, 2048), group) for group in (32, 64, 128)] + [((5632, 2048), 64), ((11008, 4096), 128)]
SHAPES_CUDA = [(shape, group) for shape in [(11008, 4096), (4096, 11008), (256, 2048)] for group in (32, 64, 128)]
CASES = [(*case, "cpu") for case in SHAPES] + [(*case, device) for case in SHAPES_CUDA for device in DEVICES[1:]]


@torch.no_grad()
@pytest.mark.parametrize(("shape", "group_size", "device"), CASES)
def test_int4_layer_matches_dense_at_real_shapes(shape, group_size, device):
    """Real 7B and 1.1B layer shapes (down, up and k/v projections) against the dense weight they encode."""
    out_features, in_features = shape
    torch.manual_seed(0)
    unsigned, scale, zero = random_layer(out_features, in_features, group_size)
    plain = Int4Linear.from_unsigned(unsigned, scale, zero, group_size, None, torch.device(device))
    packed = Int4Linear.from_unsigned(unsigned, scale, zero, group_size, None, torch.device(device)).pack()
    reference_weight = (
        (unsigned - 8) * scale.repeat_interleave(group_size, 1) + zero.repeat_interleave(group_size, 1)
    ).to(device)
    for (form, layer), rows in itertools.product((("plain", plain), ("packed", packed)), ROWS[device]):
        x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
        reference = x.float() @ reference_weight.t()
        error = ((layer(x).float() - reference).norm() / reference.norm()).item()
        assert error < 0.01, (form, rows, error)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 128])
def test_concatenated_int4_layers_compute_each_part(group_size, device):
    """quantflow.evaluation.fuse stacks the packed tiles along the output: q (2048), k and v (256 each) of the 1.1B
    shape."""
    torch.manual_seed(0)
    parts = [
        Int4Linear.from_unsigned(
            *random_layer(out_features, 2048, group_size), group_size, torch.randn(out_features), torch.device(device)
        )
        for out_features in (2048, 256, 256)
    ]  # plain: concat packs them
    joined = Int4Linear.concat(parts, torch.cat([part.bias for part in parts]))
    x = torch.randn(3, 2048, device=device, dtype=torch.bfloat16)
    torch.testing.assert_close(joined(x), torch.cat([part(x) for part in parts], dim=-1), rtol=0.01, atol=0.01)


@torch.no_grad()
def test_fusing_w4a16_packed_projections_keeps_their_outputs():
    """The GPU's decode harness packs every Int4Linear for the W4A16 kernels before it fuses q/k/v and gate/up: the
    fuse then finds no tinygemm tensors to read (it crashed on the H200 with "no attribute 'scales_and_zeros'")."""
    from quantflow.evaluation.fuse import FusedProjections, fuse_projections

    torch.manual_seed(0)
    attention = torch.nn.Module()
    for name, out_features in (("q_proj", 128), ("k_proj", 64), ("v_proj", 64)):
        layer = Int4Linear.from_unsigned(*random_layer(out_features, 256, 64), 64, None, torch.device("cpu"))
        attention.register_module(name, layer.pack("w4a16"))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    separate = [getattr(attention, name)(x) for name in ("q_proj", "k_proj", "v_proj")]
    assert fuse_projections(attention) == 1
    assert isinstance(attention.fused_q, FusedProjections) and "w4_words" in attention.fused_q.linear._buffers
    for name, expected in zip(("q_proj", "k_proj", "v_proj"), separate, strict=True):
        assert torch.equal(getattr(attention, name)(x), expected)
