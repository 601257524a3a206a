"""FP8 matmuls on the GPU: the runtime picks them on cards that have them and matches the reference maths, the Triton
kernels at real shapes, compiled and in CUDA graphs. The same kernels run at small shapes under Triton's CPU
interpreter in CI (tests/unit/test_fp8_kernels.py)."""

import itertools

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA device with FP8 matmuls (compute capability 8.9+)",
    ),
]


@torch.no_grad()
def test_cuda_fp8_layers_match_the_reference_and_the_runtime_picks_them(tmp_path):
    from quantflow.evaluation.fp8 import load_fp8
    from quantflow.evaluation.runtime import Subject, load_on_runtime
    from quantflow.infra.resources import Resources
    from quantflow.kernels.fp8 import E4M3, E4M3_MAX, FP8Linear
    from quantflow.quantization.quantize import Scheme, quantize_weights
    from quantflow.spec import FP8Variant
    from tests.conftest import make_model

    model = make_model(tmp_path / "model", hidden=256)
    out = tmp_path / "fp8"
    quantize_weights(
        str(model), FP8Variant(name="fp8"), Scheme(group_size=None), None, Resources(device="cuda"), out, out
    )
    fp8 = load_fp8(out, "cuda")
    layers = [(n, m) for n, m in fp8.named_modules() if isinstance(m, FP8Linear)]
    for (name, layer), rows in itertools.product(layers, (1, 3)):  # 1 on fp8_gemv, 3 on _scaled_mm
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16, device="cuda")
        scale = x.float().abs().amax(-1, keepdim=True) / E4M3_MAX
        weight = layer.weight.float() * layer.scale.t()
        expected = ((x.float() / scale).to(E4M3).float() * scale) @ weight.t()
        error = ((layer(x).float() - expected).norm() / expected.norm()).item()
        assert error < 0.01, (name, rows, error)
    name, layer = layers[0]
    for rows in (1, 8):  # as the decode harness runs them: compiled, in a CUDA graph
        torch.compiler.reset()
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16, device="cuda")
        compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
        eager, graphed = layer(x).float(), [compiled(x).float() for _ in range(3)][-1]
        assert ((graphed - eager).norm() / eager.norm()).item() < 1e-3, (name, rows)
    loaded, _, _, runtime = load_on_runtime(Subject(name="fp8", model_path=str(out)), "auto", Resources(device="cuda"))
    assert "FP8 matmuls" in runtime and isinstance(loaded.model.layers[0].mlp.up_proj, FP8Linear)


@torch.no_grad()
@pytest.mark.parametrize(("out_features", "in_features", "rows", "split_k"), [
    (96, 4096, 1, 1), (4112, 1000, 1, 1), (4112, 1000, 5, 2), (22016, 4096, 16, 1), (32, 8192, 3, 4),
])  # fmt: skip
def test_the_gemv_matches_the_reference_on_ragged_widths_several_rows_and_split_inputs(
    out_features, in_features, rows, split_k
):
    """Ragged input widths (masked loads), rows padded up to the 16 of a tensor-core tile, split inputs (atomics)."""
    from quantflow.kernels.e4m3 import E4M3, E4M3_MAX
    from quantflow.kernels.fp8_gemv import GemvConfig, fp8_gemv, gemv_config, launch

    dense = torch.randn(out_features, in_features, device="cuda") * 0.02
    w_scale = dense.abs().amax(1, keepdim=True) / E4M3_MAX
    weight = (dense / w_scale).to(E4M3)
    x = torch.randn(rows, in_features, device="cuda")
    x_scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    xq = (x / x_scale).to(E4M3)
    expected = (xq.float() * x_scale) @ (weight.float() * w_scale).t()
    chosen = gemv_config(out_features, in_features)
    for y in (
        fp8_gemv(xq, x_scale, weight, w_scale.t().contiguous()),
        launch(xq, x_scale, weight, w_scale.t().contiguous(), GemvConfig(block_n=chosen.block_n, split_k=split_k)),
    ):
        assert y.shape == (rows, out_features)
        assert ((y - expected).norm() / expected.norm()).item() < 1e-4, (chosen, split_k)


@torch.no_grad()
@pytest.mark.parametrize(("hidden", "intermediate"), [(4096, 11008), (576, 1536), (208, 336)])
def test_the_gated_mlp_at_one_row_is_as_close_to_the_exact_maths_as_its_linears_path(hidden, intermediate):
    """The three-kernel path (SiLU·mul and row maxima in the gate/up kernel, the scaling kernel, the down GEMV),
    eager and compiled, against fp32 maths on the dequantized weights with no activation rounding: no further from it
    than the same module's path through its Linears (two rows, on _scaled_mm). Both round activations to e4m3 twice
    (a few percent each), so they are compared through the exact result, not to each other. 208 and 336 are not
    multiples of 256."""
    from quantflow.kernels.fp8 import E4M3, E4M3_MAX, FP8GatedMLP, FP8Linear

    def linear(out_features: int, in_features: int) -> FP8Linear:
        dense = torch.randn(out_features, in_features, device="cuda") * 0.02
        scale = dense.abs().amax(1, keepdim=True) / E4M3_MAX
        return FP8Linear((dense / scale).to(E4M3), scale, None)

    def dense(layer: FP8Linear) -> torch.Tensor:
        return layer.weight.float() * layer.scale.t()

    gate, up, down = linear(intermediate, hidden), linear(intermediate, hidden), linear(hidden, intermediate)
    x = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)
    exact = (torch.nn.functional.silu(x.float() @ dense(gate).t()) * (x.float() @ dense(up).t())) @ dense(down).t()
    mlp = FP8GatedMLP(gate, up, down)

    def error(y: torch.Tensor) -> float:
        return ((y.float() - exact).norm() / exact.norm()).item()

    linears = error(mlp(x.expand(1, 2, hidden))[:, :1])
    for y in (mlp(x), torch.compile(mlp, fullgraph=True)(x)):
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        assert error(y) < 1.1 * linears + 1e-3, (error(y), linears)
    assert linears < 0.1
