"""The FP4 kernels at 7B shapes on the GPU: the self-check, decode products within one bf16 rounding of float64 for
NVFP4 and MXFP4 at every decode row count, the dequantization bit for bit, and the FP4Linear under torch.compile
with CUDA graphs (GPU machines only)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = [("nvfp4-pack-quantized", 12288, 4096), ("mxfp4-pack-quantized", 4096, 11008)]


def fp4_weight(fmt: str, out: int, width: int, seed: int):
    from quantflow.kernels.fp4 import GROUPS, from_compressed

    generator = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, (out, width // 2), generator=generator, device="cuda", dtype=torch.uint8)
    groups = width // GROUPS[fmt]
    if fmt.startswith("nvfp4"):
        scale = (torch.rand(out, groups, generator=generator, device="cuda") * 400 + 1).to(torch.float8_e4m3fn)
        return from_compressed(packed, scale, torch.tensor([448.0 * 6 / 0.37], device="cuda"), fmt)
    scale = torch.randint(118, 130, (out, groups), generator=generator, device="cuda", dtype=torch.uint8)
    return from_compressed(packed, scale, None, fmt)


def test_the_kernel_passes_its_self_check_here():
    from quantflow.kernels.fp4 import device_problem

    assert device_problem(torch.device("cuda")) is None


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{f[:5]}-{o}x{i}" for f, o, i in SHAPES])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_decode_product_is_within_one_bf16_rounding_of_float64(shape, rows):
    from quantflow.kernels.fp4 import block_k, decode_linear, dequantize

    weight = fp4_weight(*shape, seed=rows)
    x = torch.randn(rows, shape[2], device="cuda").to(torch.bfloat16)
    dense = dequantize(weight, torch.float64)
    reference = x.double() @ dense.t()
    slack = (x.double().abs() @ dense.abs().t()) * 2**-8  # each weight rounded once to bf16, fp32 sums
    y = decode_linear(x, weight, block_k=block_k(shape[2]))
    assert ((y.double() - reference).abs() / (reference.abs() * 2**-7 + slack)).max().item() <= 1.0


def test_fp4_linear_compiles_into_a_cuda_graph_with_the_eager_numbers():
    from quantflow.kernels.fp4 import FP4Linear

    layer = FP4Linear(fp4_weight(*SHAPES[0], seed=0), None)
    x = torch.randn(4, SHAPES[0][2], device="cuda").to(torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        y = compiled(x)
    assert torch.equal(y, eager) and layer.route(4, x.device) == "FP4 Triton decode"


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{f[:5]}-{o}x{i}" for f, o, i in SHAPES])
def test_kernel_dequantization_is_the_reference_bit_for_bit(shape):
    """The long-input path's weight: on the GPU float32 rounds to bf16 to nearest, as torch does."""
    from quantflow.kernels.fp4 import FP4Linear, dequantize, dequantize_on_kernel

    weight = fp4_weight(*shape, seed=3)
    assert torch.equal(dequantize_on_kernel(weight), dequantize(weight))
    layer = FP4Linear(weight, None)
    x = torch.randn(40, shape[2], device="cuda").to(torch.bfloat16)
    assert layer.route(40, x.device) == "FP4 dequantized to bf16 by Triton + cuBLAS"
    assert torch.equal(layer(x), x @ dequantize(weight).t())


def test_fp4_variants_run_on_the_fp4_kernels_through_the_pipeline(tmp_path):
    """`evaluation.kernels: fp4`: NVFP4 and MXFP4 W4A16 rows on FP4Linear and timed; a W4 INT row beside them runs as
    under 'auto' (int4 kernels); the W4A4 row is not timed."""
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec
    from tests.conftest import make_model, small_spec

    model = make_model(tmp_path / "model", hidden=256)
    variants = [
        {"method": "nvfp4"},
        {"method": "mxfp4"},
        {"method": "nvfp4", "activations": "a4", "name": "nvfp4-a4"},
        {"method": "rtn", "group_size": 64},
    ]
    raw = small_spec(model, tmp_path / "out", tmp_path / "cache", variants, kernels="fp4")
    raw["device"] = "cuda"
    rows = {r.name: r for r in load_report(pipeline.run(parse_spec(raw), progress=lambda _: None) / "report.json").rows}
    for name in ("nvfp4", "mxfp4"):
        assert "FP4 weights on quantflow's Triton kernels" in rows[name].runtime, rows[name].runtime
        assert 0 < rows[name].kl_mean < 0.5 and all(s["decode_tokens_per_s"] > 0 for s in rows[name].speed)
    assert "int4" in rows["rtn"].runtime and not rows["nvfp4-a4"].speed
