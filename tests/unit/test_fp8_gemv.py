"""The FP8 runtime's few-row path: the same W8A8 product as the reference maths, in any backend."""

import torch

from quantflow.evaluation.fp8 import E4M3, E4M3_MAX, FP8Linear


def test_fp8_gemv_is_the_scaled_w8a8_product():
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    weight_scale = weight.abs().amax(-1, keepdim=True) / E4M3_MAX
    layer = FP8Linear((weight / weight_scale).to(E4M3), weight_scale, torch.randn(48))
    x = torch.randn(2, 64)
    scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    quantized = (x / scale).to(E4M3)
    expected = (quantized.float() * scale) @ (layer.weight.float() * layer.scale.t()).t() + layer.bias.float()
    torch.testing.assert_close(layer.gemv(quantized, scale).float(), expected, rtol=1e-2, atol=1e-2)
    assert ((layer.gemv(quantized, scale).float() - x @ weight.t() - layer.bias.float()).norm() / expected.norm()) < 0.1
