"""The W4A16 kernels at 7B shapes on the GPU: the inline-PTX unpack forms against the plain one, the products within
bf16 rounding of a float64 reference, CUDA graphs and torch.compile (GPU machines only)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (out, in, group or None for channel-wise, symmetric): the 7B layer's Linears across the schemes
SHAPES = [(12288, 4096, 128, False), (4096, 4096, 64, True), (22016, 4096, 32, False), (4096, 11008, None, True)]


def quantized(out: int, width: int, group: int | None, symmetric: bool, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    group = group or width
    q = torch.randint(-8, 8, (out, width), generator=generator, device="cuda", dtype=torch.int8)
    scale = (torch.rand(out, width // group, generator=generator, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    zp = None if symmetric else torch.randint(-8, 8, scale.shape, generator=generator, device="cuda", dtype=torch.int8)
    zero = zp.double().repeat_interleave(group, dim=1) if zp is not None else 0.0
    exact = (q.double() - zero) * scale.double().repeat_interleave(group, dim=1)
    return q, scale, zp, group, exact


def within_rounding(y: torch.Tensor, x: torch.Tensor, exact: torch.Tensor, ulps: float, sums: float) -> float:
    """The worst error of ``y`` in units of ``ulps`` bf16 roundings of the float64 product, plus ``sums`` (relative
    to the sum of |x w|: fp32 sums, the decode kernel's offset taken out after them)."""
    reference = x.double() @ exact.t()
    slack = (x.double().abs() @ exact.abs().t()) * sums
    return ((y.double() - reference).abs() / (reference.abs() * 2**-8 * ulps + slack)).max().item()


def test_the_ptx_unpack_runs_here_and_matches_the_plain_one():
    from quantflow.kernels import w4a16
    from quantflow.kernels.w4_pack import dequantize, repack

    assert w4a16.self_check(torch.device("cuda")) == w4a16.LOP3
    q, scale, zp, group, exact = quantized(4096, 4096, 128, False, 0)
    unit = repack(q, torch.ones_like(scale), None, group)  # scale 1, offset 136: the decode product of e_k is q[:, k]
    weight = repack(q, scale, zp, group)
    x = torch.randn(8, 4096, device="cuda").to(torch.bfloat16)
    eye = torch.eye(4096, device="cuda", dtype=torch.bfloat16)
    config = w4a16.DecodeConfig(block_n=64, split_k=3)  # 32 tiles: the last split runs short
    assert torch.equal(w4a16.dequantize_launch(weight), dequantize(weight))
    products = {}
    for form in w4a16.FORMS:
        unpacked = torch.cat([w4a16.decode_launch(eye[k : k + 32], unit, config, form) for k in range(0, 4096, 32)])
        assert torch.equal(unpacked.t().to(torch.int8), q), form  # the unpack, bit for bit
        products[form] = w4a16.decode_launch(x, weight, config, form)
        assert within_rounding(products[form], x, exact, 1.0, 2**-18) <= 1.0, form
    assert torch.equal(products[w4a16.LOP3], products[w4a16.PLAIN])


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}-g{g}-{'sym' if s else 'asym'}" for o, i, g, s in SHAPES])
def test_linear_at_7b_shapes_is_within_bf16_rounding_for_every_row_count(shape):
    from quantflow.kernels import linear, route
    from quantflow.kernels.w4_pack import dequantize, repack

    q, scale, zp, group, exact = quantized(*shape, seed=1)
    weight = repack(q, scale, zp, group)
    rounded = dequantize(weight).double()  # what cuBLAS multiplies on the prefill path
    for rows in (1, 3, 8, 16, 17, 32, 2048):
        x = torch.randn(rows, shape[1], device="cuda").to(torch.bfloat16)
        assert not route(rows, x, weight).startswith("reference")
        y = linear(x, weight)
        if rows <= 32:  # decode: the exact weight's fp32 sums, rounded once
            assert within_rounding(y, x, exact, 1.0, 2**-18) <= 1.0, rows
        else:  # prefill: cuBLAS's product of the bf16 weight
            assert within_rounding(y, x, rounded, 1.0, 2**-16) <= 1.0, rows
        assert not weight.count.any()


def test_decode_replays_in_a_cuda_graph_and_compiles():
    from quantflow.kernels import linear
    from quantflow.kernels.w4_pack import repack

    q, scale, zp, group, exact = quantized(4096, 11008, 128, False, 2)
    weight = repack(q, scale, zp, group)
    x = torch.randn(4, 11008, device="cuda").to(torch.bfloat16)
    eager = linear(x, weight)
    graph = torch.cuda.CUDAGraph()
    linear(x, weight)  # warm up outside the capture
    with torch.cuda.graph(graph):
        captured = linear(x, weight)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(captured, linear(x, weight))
    compiled = torch.compile(lambda inputs: linear(inputs, weight), fullgraph=True)
    assert torch.equal(compiled(x), linear(x, weight))
    assert not torch.equal(eager, captured)  # the replays did read the new inputs


def test_int4_linear_packs_to_w4a16_on_cuda_and_fuses_like_tinygemm():
    from quantflow.evaluation.int4 import Int4Linear

    layers = []
    for seed, out in enumerate((4096, 1024, 1024)):  # q, k, v of a grouped-query layer
        q, scale, zp, group, exact = quantized(out, 4096, 128, False, 10 + seed)
        zero = -zp.float() * scale.float()
        layers.append((Int4Linear.from_unsigned(q.int() + 8, scale.float(), zero, group, None, "cuda"), exact))
    x = torch.randn(8, 4096, device="cuda").to(torch.bfloat16)
    fresh = [Int4Linear.from_unsigned(layer.unsigned().int(), *layer.scales_and_zeros.transpose(0, 1).float().unbind(2),
                                      128, None, "cuda") for layer, _ in layers]  # fmt: skip
    tinygemm = Int4Linear.concat([layer.pack("tinygemm") for layer, _ in layers], None)
    assert all("w4_words" in layer.pack("auto")._buffers for layer in fresh)  # 'auto' picks W4A16 here
    joined = Int4Linear.concat(fresh, None)
    exact = torch.cat([e for _, e in layers])
    assert within_rounding(joined(x), x, exact, 1.0, 2**-18) <= 1.0
    assert within_rounding(tinygemm(x), x, exact, 4.0, 2**-9) <= 1.0  # tinygemm's bf16 zero rounds once more
