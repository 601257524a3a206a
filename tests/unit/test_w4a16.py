"""The W4A16 kernels under Triton's CPU interpreter at small shapes: the unpack bit-exact, the products within one
bf16 rounding of a float64 reference, and the reference (labelled) wherever no kernel can run.

The interpreter must be chosen before Triton compiles anything, so the kernel checks run in a child process with
TRITON_INTERPRET=1 (this process may hold compiled kernels). The inline-PTX unpack cannot run there: the plain one
runs on the same layout and tiling here, and tests/gpu/test_w4a16_cuda.py checks the PTX forms against it.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_interpreted

# (out, in, group or None for channel-wise, symmetric, rows, split_k): groups 16/32/64/128/192 and channel-wise, sym
# and asym, K tiles of 128 (several groups each, or part of one) and 64, N not a multiple of 64, 1-16 rows (padded to
# 16) and 17-32 (padded to 32), split-K off, even and running short
CASES = [
    (96, 256, 32, True, 1, 2),
    (128, 256, 64, False, 5, 1),
    (70, 256, 128, False, 3, 2),
    (64, 640, 128, True, 17, 3),
    (128, 256, None, False, 2, 2),
    (64, 192, None, True, 1, 1),
    (64, 384, 192, False, 4, 2),
    (64, 128, 16, False, 2, 1),
]


def quantized(out: int, width: int, group: int | None, symmetric: bool, seed: int):
    """Random compressed-tensors-style q in [-8, 7], bf16 scales, zero points (None when symmetric), group size."""
    generator = torch.Generator().manual_seed(seed)
    group = group or width
    q = torch.randint(-8, 8, (out, width), generator=generator, dtype=torch.int8)
    scale = (torch.rand(out, width // group, generator=generator) * 0.02 + 0.001).to(torch.bfloat16)
    zp = None if symmetric else torch.randint(-8, 8, scale.shape, generator=generator, dtype=torch.int8)
    return q, scale, zp, group


def float64_weight(q, scale, zp, group) -> torch.Tensor:
    zero = zp.double().repeat_interleave(group, dim=1) if zp is not None else 0.0
    return (q.double() - zero) * scale.double().repeat_interleave(group, dim=1)


def decoded_nibbles(unit, width: int) -> torch.Tensor:
    """q as the decode kernel unpacks it: the unit weight (scale 1, offset 136) times one-hot rows, 16 inputs a launch."""
    from quantflow.kernels import w4a16

    eye = torch.eye(width, dtype=torch.bfloat16)
    config = w4a16.DecodeConfig(split_k=1)
    return torch.cat([w4a16.decode_launch(eye[k : k + 16], unit, config, w4a16.PLAIN) for k in range(0, width, 16)]).t()


def interpreted_checks() -> dict:
    """Run in the child: for every case, the unpack (prefill and decode paths), the decode product and the counters."""
    from quantflow.kernels import w4a16
    from quantflow.kernels.w4_pack import BIAS, repack

    results = {}
    for index, (out, width, group, symmetric, rows, split) in enumerate(CASES):
        q, scale, zp, group = quantized(out, width, group, symmetric, index)
        unit = repack(q, torch.ones_like(scale), None, group)  # scale 1, offset 136: the kernel's unpack gives q
        unpacked = w4a16.dequantize_launch(unit)
        decoded = decoded_nibbles(unit, width) if index < 2 else q  # two cases: the interpreter is slow
        weight = repack(q, scale, zp, group)
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(100 + index)).to(torch.bfloat16)
        reference = x.double() @ float64_weight(q, scale, zp, group).t()
        slack = (x.double().abs() @ float64_weight(q, scale, zp, group).abs().t()) * 2**-20  # fp32 sums
        ulps = []
        for block_n in (64, 128):
            y = w4a16.decode_launch(x, weight, w4a16.DecodeConfig(block_n=block_n, split_k=split), w4a16.PLAIN)
            ulps.append(((y.double() - reference).abs() / (reference.abs() * 2**-7 + slack)).max().item())
        results[str(index)] = {
            "unpack_exact": torch.equal(unpacked.to(torch.int8), q) and unit.offset.eq(BIAS).all().item(),
            "decode_unpack_exact": torch.equal(decoded.to(torch.int8), q),
            "ulps": max(ulps),
            "counters_zero": not weight.count.any().item(),
        }
    from quantflow.kernels import kernels_label, route

    cpu = torch.device("cpu")
    results["labels"] = [
        route(1, torch.ones(1, 256), weight),
        route(33, torch.ones(1, 256), weight),
        kernels_label(cpu),
    ]
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted("tests.unit.test_w4a16", "interpreted_checks")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(case) for case in CASES])
def test_decode_kernel_unpacks_exactly_and_multiplies_within_one_bf16_rounding(interpreted, case):
    result = interpreted[str(case)]
    assert result["unpack_exact"]
    assert result["decode_unpack_exact"]
    assert result["ulps"] <= 1.0, result  # the interpreter truncates to bf16 where the GPU rounds: one ulp, not half
    assert result["counters_zero"]  # the last program of each block reset its split-K counter


def test_the_labels_name_the_kernel_and_its_unpack(interpreted):
    from quantflow.kernels import kernels_label

    decode, prefill, label = interpreted["labels"]  # the interpreter runs the plain unpack
    assert (decode, prefill) == ("W4A16 Triton decode (plain unpack)", "W4A16 unpack to bf16 + cuBLAS")
    assert label == "W4A16 Triton kernels (tensor-core decode to 32 rows with the plain unpack, bf16 + cuBLAS above)"
    assert kernels_label(torch.device("cpu")) == (
        "W4A16 dequantized reference, no kernel (the W4 kernels run on CUDA GPUs)"
    )  # no interpreter in this process


def test_repack_keeps_every_nibble_and_the_reference_is_compressed_tensors_dequantization():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from quantflow.kernels.w4_pack import dequantize, repack, unsigned_nibbles

    for group, symmetric in ((32, False), (128, True), (None, False)):
        q, scale, zp, size = quantized(70, 256, group, symmetric, 7)
        signed = unpack_from_int32(pack_to_int32(q, 4), 4, q.shape)  # what an artifact's loader gets
        weight = repack(signed, scale, zp, size)
        assert torch.equal(unsigned_nibbles(weight), q.int() + 8)
        assert torch.equal(dequantize(weight), float64_weight(q, scale, zp, size).float().to(torch.bfloat16))


def test_a_layout_no_kernel_takes_runs_the_reference_and_says_why():
    from quantflow.kernels import linear, route
    from quantflow.kernels.w4_pack import reference_linear, repack, unsigned_nibbles

    q, scale, zp, _ = quantized(10, 128, 64, False, 3)  # 100 inputs: group 64 does not divide them
    weight = repack(q[:, :100], scale, zp, 64)
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    assert route(3, x, weight) == "reference, no kernel (group size 64 does not divide the 100 inputs)"
    exact = float64_weight(q, scale, zp, 64)[:, :100]
    rounding = (x.double().abs() @ exact.abs().t()) * 2**-8  # the weight's bf16 rounding, then the output's
    assert ((linear(x, weight).double() - x.double() @ exact.t()).abs() <= rounding * 2).all()
    assert torch.equal(linear(x, weight), reference_linear(x, weight))
    q, scale, zp, group = quantized(64, 96, None, True, 5)  # channel-wise over 96 inputs: no K tile of 64 fits
    weight = repack(q, scale, zp, group)
    assert route(1, x[:, :96], weight).startswith(
        "reference, no kernel (group size 96 over 96 inputs: the kernels take"
    )
    assert torch.equal(unsigned_nibbles(weight), q.int() + 8)


def test_on_cpu_without_the_interpreter_linear_is_the_reference():
    from quantflow.kernels import linear, route
    from quantflow.kernels.w4_pack import reference_linear, repack

    q, scale, zp, group = quantized(64, 128, 32, False, 4)
    weight = repack(q, scale, zp, group)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert route(2, x, weight).startswith("reference, no kernel (")
    assert torch.equal(linear(x, weight), reference_linear(x, weight))
