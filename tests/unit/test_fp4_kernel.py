"""The FP4 decode kernel (quantflow.kernels.fp4): its dequantization against compressed-tensors' own, and its
product under Triton's CPU interpreter against float64, for NVFP4 and MXFP4 weights."""

import pytest
import torch

from tests.conftest import run_interpreted

CASES = [  # (format, out features, in features, rows)
    ("nvfp4-pack-quantized", 96, 256, 1),
    ("nvfp4-pack-quantized", 64, 128, 16),
    ("mxfp4-pack-quantized", 80, 256, 5),
]


def fp4_weight(fmt: str, out: int, width: int, seed: int):
    """Random codes and scales as an artifact stores them: uint8 pairs of nibbles, FP8 E4M3 scales with a float32
    global scale (NVFP4) or E8M0 exponent bytes (MXFP4)."""
    from quantflow.kernels.fp4 import GROUPS, from_compressed

    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (out, width // 2), generator=generator, dtype=torch.uint8)
    groups = width // GROUPS[fmt]
    if fmt.startswith("nvfp4"):
        tiny = torch.where(torch.rand(out, groups, generator=generator) < 0.1, 2.0**-12, 1.0)  # E4M3 subnormals
        scale = ((torch.rand(out, groups, generator=generator) * 400 + 1) * tiny).to(torch.float8_e4m3fn)
        global_scale = torch.tensor([448.0 * 6 / 0.37])
        return packed, scale, global_scale, from_compressed(packed, scale, global_scale, fmt)
    scale = torch.randint(118, 130, (out, groups), generator=generator, dtype=torch.uint8)
    return packed, scale, None, from_compressed(packed, scale, None, fmt)


def interpreted_checks() -> dict:
    """Run in the child, under the interpreter: each case's kernel product against float64, in bf16 ulps."""
    from quantflow.kernels.fp4 import decode_linear, dequantize, reference_linear

    results = {}
    for index, (fmt, out, width, rows) in enumerate(CASES):
        *_, weight = fp4_weight(fmt, out, width, index)
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(50 + index)).to(torch.bfloat16)
        dense = dequantize(weight, torch.float64)
        reference = reference_linear(x.double(), weight)
        slack = (x.double().abs() @ dense.abs().t()) * 2**-8  # each weight rounded once to bf16, fp32 sums
        y = decode_linear(x, weight, block_n=32, block_k=32)
        results[str(index)] = {
            "shape": list(y.shape),
            "worst": ((y.double() - reference).abs() / (reference.abs() * 2**-7 + slack)).max().item(),
        }
    results.update(every_scale_byte())
    results["dequantize"] = dequantized_on_the_kernel()
    from quantflow.kernels.fp4 import self_check

    results["self_check"] = self_check(torch.device("cpu"))
    return results


def dequantized_on_the_kernel() -> list[float]:
    """The Triton dequantization's worst distance from ``dequantize`` per case (K steps of 64, 32 and 16 bytes), in
    bf16 units in the last place. The interpreter rounds float32 to bf16 toward zero where GPUs round to nearest, so
    here it may be off by one (bit for bit on the GPU: tests/gpu/test_fp4_cuda.py)."""
    from quantflow.kernels.fp4 import dequantize, dequantize_on_kernel

    cases = [*((fmt, out, width) for fmt, out, width, _ in CASES), ("mxfp4-pack-quantized", 40, 224)]
    worst = []
    for weight in (fp4_weight(*case, 9)[-1] for case in cases):
        got, want = dequantize_on_kernel(weight).double(), dequantize(weight).double()
        unit = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-126))) - 7)
        worst.append(((got - want).abs() / unit).max().item())
    return worst


def every_scale_byte() -> dict:
    """Every finite scale byte read through the kernel: all codes 1.0, the activations' row ``r`` one-hot at group
    ``r``'s first weight, so output [r, n] is row n's scale of group r, exactly (16 x 16 bytes per format)."""
    from quantflow.kernels.fp4 import GROUPS, decode_linear, from_compressed, group_scales

    results = {}
    for fmt, group in GROUPS.items():
        codes = torch.full((16, 8 * group), 0x22, dtype=torch.uint8)  # nibble 2: E2M1 1.0, twice a byte
        byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
        if fmt.startswith("nvfp4"):
            byte[(byte & 0x7F) == 0x7F] = 0x38  # E4M3's NaNs replaced by 1.0
            weight = from_compressed(codes, byte.view(torch.float8_e4m3fn), torch.tensor([1.0]), fmt)
        else:
            byte[(byte == 0) | (byte == 255)] = 127  # E8M0's NaN, and 2^-127, below bf16's normal range
            weight = from_compressed(codes, byte, None, fmt)
        x = torch.zeros(16, 16 * group, dtype=torch.bfloat16)
        x[torch.arange(16), torch.arange(16) * group] = 1
        y = decode_linear(x, weight, block_n=16, block_k=16)
        results[fmt] = {"exact": torch.equal(y.float(), group_scales(weight).t()), "tried": byte.unique().numel()}
    return results


def test_kernel_dequantization_is_the_reference_within_one_bf16_unit_and_the_self_check_passes(interpreted):
    assert interpreted["self_check"] is None and len(interpreted["dequantize"]) == len(CASES) + 1
    assert max(interpreted["dequantize"]) <= 1.0 and interpreted["dequantize"][2:] == [0.0, 0.0]  # MXFP4: exact


def test_every_scale_byte_decodes_exactly(interpreted):
    """E4M3's normals, subnormals, zero and signs; E8M0's 2^-126 to 2^127."""
    assert interpreted["nvfp4-pack-quantized"] == {"exact": True, "tried": 254}
    assert interpreted["mxfp4-pack-quantized"] == {"exact": True, "tried": 254}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted("tests.unit.test_fp4_kernel", "interpreted_checks")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(case) for case in CASES])
def test_decode_kernel_is_within_one_bf16_rounding_of_float64(interpreted, case):
    fmt, out, _, rows = CASES[case]
    result = interpreted[str(case)]
    assert result["shape"] == [rows, out] and result["worst"] <= 1.0, result


@pytest.mark.parametrize("fmt", ["nvfp4-pack-quantized", "mxfp4-pack-quantized"])
def test_dequantize_is_compressed_tensors_own_decompression(fmt):
    """Bit for bit: compressed-tensors' unpack times NVFP4's scale / global scale or MXFP4's 2^(s - 127), rounded
    once."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    from quantflow.kernels.fp4 import dequantize

    packed, scale, global_scale, weight = fp4_weight(fmt, 48, 128, 7)
    values = unpack_fp4_from_uint8(packed, 48, 128, dtype=torch.float32)
    if global_scale is not None:
        effective = scale.to(torch.float32) / global_scale
    else:
        effective = torch.pow(2.0, scale.to(torch.float32) - 127)
    expected = (values * effective.repeat_interleave(128 // scale.shape[1], dim=1)).to(torch.bfloat16)
    assert torch.equal(dequantize(weight), expected)
    assert values.abs().max() == 6 and (values == 0).any() and (values < 0).any()


def test_decode_refuses_what_it_cannot_take():
    from quantflow.kernels.fp4 import decode_linear, from_compressed

    *_, weight = fp4_weight("nvfp4-pack-quantized", 32, 128, 0)
    with pytest.raises(ValueError, match="1-16 rows"):
        decode_linear(torch.zeros(17, 128), weight)
    with pytest.raises(ValueError, match="not an FP4 format"):
        from_compressed(weight.packed, weight.scale, None, "pack-quantized")
    bf16_scales = torch.ones(32, 8, dtype=torch.bfloat16)  # a scale_dtype override: not the bytes the kernel reads
    with pytest.raises(ValueError, match="scales stored as torch.bfloat16"):
        from_compressed(weight.packed, bf16_scales, torch.tensor([1.0]), "nvfp4-pack-quantized")
    with pytest.raises(ValueError, match="without its global scale"):
        from_compressed(weight.packed, weight.scale.view(torch.float8_e4m3fn), None, "nvfp4-pack-quantized")
