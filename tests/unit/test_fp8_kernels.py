"""The FP8 Triton kernels under Triton's CPU interpreter at small shapes: the few-row GEMV (ragged input widths,
several rows, split inputs) within fp32 rounding of the same e4m3 maths, and the gated MLP's three kernels as close to
the exact maths as the Linears' path (``_scaled_mm``, which runs on the CPU too). tests/gpu/test_fp8_cuda.py runs
them at real shapes, compiled and in CUDA graphs.

As in test_w4a16.py, the interpreter must be chosen before Triton compiles anything, so the checks run in a child
process with TRITON_INTERPRET=1. The child records every kernel the interpreter launches: a path that left the
kernels (a torch fallback) would launch none, and the tests say which kernels each result came from.
"""

from __future__ import annotations

import pytest
import torch

from quantflow.kernels.e4m3 import E4M3, E4M3_MAX
from tests.conftest import run_interpreted

# (out, in, rows, split_k): K a multiple of the 256-wide tile and not (masked loads), one row and the 16 of a
# tensor-core tile, inputs split in two and in four (fp32 atomics; 1100 inputs leave the last split short)
GEMV_CASES = [(64, 512, 1, 1), (70, 300, 1, 1), (40, 1000, 5, 2), (16, 256, 16, 1), (32, 1100, 3, 4)]
MLP_CASES = [(208, 336), (64, 96)]  # (hidden, intermediate): neither a multiple of the 256-wide tile


def record_launches() -> list[str]:
    """Make the interpreter run these kernels as a GPU does, and list the kernels it launches, by name, in order.

    Two faults of Triton 3.6's interpreter, each fixed here and nothing else changed: it holds a scalar as a
    one-element array and converts it with ``int()``, which NumPy 2.4 refuses for arrays with a dimension (the GEMV's
    loop bound ``tl.minimum(start + span, K)`` needs that conversion); and its own fp32 to e4m3 conversion drops the
    carry when the mantissa rounds up (7.77 became 4.0, not 8.0) and truncates to bf16, where the GPU rounds both to
    nearest even, as torch's conversions do."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor, launch, convert = (
        interpreter._patch_lang_tensor,
        interpreter.GridExecutor.__call__,
        interpreter._convert_float,
    )
    narrow = {tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16), tl.float8e4nv: (E4M3, torch.uint8, np.uint8)}
    launched: list[str] = []

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def converted(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype not in narrow:
            return convert(values, input_dtype, output_dtype, rounding_mode)
        dtype, bits, np_bits = narrow[output_dtype]
        wide = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return wide.to(dtype).view(bits).numpy().view(np_bits)

    def recorded(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return launch(self, *args, **kwargs)

    interpreter._patch_lang_tensor, interpreter._convert_float = patched, converted
    interpreter.GridExecutor.__call__ = recorded
    return launched


def e4m3_rows(rows: int, width: int, generator: torch.Generator, scale: float = 1.0):
    """Random rows in e4m3 with their fp32 per-row scales, as FP8Linear quantizes activations and stores weights."""
    dense = torch.randn(rows, width, generator=generator) * scale
    row_scale = dense.abs().amax(1, keepdim=True) / E4M3_MAX
    return (dense / row_scale).to(E4M3), row_scale


def relative(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.float() - expected).norm() / expected.norm()).item()


def gemv_checks(launched: list[str]) -> dict:
    """Each GEMV case on its default blocks and on the case's split, against fp32 maths on the same e4m3 values."""
    from quantflow.kernels.fp8_gemv import GemvConfig, fp8_gemv, launch

    results = {}
    for index, (out_features, in_features, rows, split_k) in enumerate(GEMV_CASES):
        generator = torch.Generator().manual_seed(index)
        weight, w_scale = e4m3_rows(out_features, in_features, generator, 0.02)
        x, x_scale = e4m3_rows(rows, in_features, generator)
        expected = (x.float() * x_scale) @ (weight.float() * w_scale).t()
        start = len(launched)
        outputs = [
            fp8_gemv(x, x_scale, weight, w_scale.t().contiguous()),
            launch(x, x_scale, weight, w_scale.t().contiguous(), GemvConfig(split_k=split_k)),
        ]
        results[str(index)] = {
            "shapes": [list(y.shape) for y in outputs],
            "errors": [relative(y, expected) for y in outputs],
            "launched": launched[start:],
        }
    return results


def mlp_checks(launched: list[str]) -> dict:
    """Each gated MLP at one row: its gate/up kernel against fp32 maths on the same e4m3 input, its scaling kernel
    against FP8Linear's own per-token scaling of the same bf16 values, the module's three kernels end to end and its
    Linears' path (two rows, ``_scaled_mm``) against the exact maths, and its down Linear at one row (the GEMV)
    against the same Linear on ``_scaled_mm``."""
    from quantflow.kernels.fp8 import FP8GatedMLP, FP8Linear
    from quantflow.kernels.fp8_mlp import BLOCK_N, fp8_gate_up_silu, fp8_scale_rows

    results = {}
    for index, (hidden, intermediate) in enumerate(MLP_CASES):
        generator = torch.Generator().manual_seed(100 + index)
        gate, up, down = (
            FP8Linear(*e4m3_rows(o, i, generator, 0.02), None)
            for o, i in ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
        )
        mlp = FP8GatedMLP(gate, up, down)
        x = torch.randn(1, 1, hidden, generator=generator).to(torch.bfloat16)
        x_q, x_scale = FP8Linear.quantize(x[0])
        rounded = x_q.float() * x_scale
        expected_h = torch.nn.functional.silu(rounded @ gate.dequantized().t()) * (rounded @ up.dequantized().t())
        start = len(launched)
        h, peaks = fp8_gate_up_silu(x_q, x_scale, mlp.gate_up.weight, mlp.gate_up.scale)
        q, scale = fp8_scale_rows(h, peaks)
        expected_q, expected_scale = FP8Linear.quantize(h)
        padded = torch.nn.functional.pad(h.float().abs(), (0, peaks.shape[0] * BLOCK_N - intermediate))
        exact = (
            torch.nn.functional.silu(x[0].float() @ gate.dequantized().t()) * (x[0].float() @ up.dequantized().t())
        ) @ down.dequantized().t()
        parts = len(launched)
        kernels, linears = mlp(x), mlp(x.expand(1, 2, hidden))[:, :1]
        modules = len(launched)
        down_gemv, down_scaled_mm = down(h), down(h.expand(2, intermediate))[:1]
        results[str(index)] = {
            "h_ulps": ((h.float() - expected_h).abs() / (expected_h.abs() * 2**-8 + 1e-6)).max().item(),
            "peaks_exact": torch.equal(peaks[:, 0], padded.reshape(-1, BLOCK_N).amax(1)),
            "q_exact": torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)),
            "scale_exact": torch.equal(scale, expected_scale),
            "shape_dtype": [list(kernels.shape), str(kernels.dtype)],
            "kernels": relative(kernels[0], exact),
            "linears": relative(linears[0], exact),
            "down": relative(down_gemv, down_scaled_mm.float()),
            "launched": [launched[start:parts], launched[parts:modules], launched[modules:]],
        }
    return results


def interpreted_checks() -> dict:
    """Run in the child, under the interpreter."""
    launched = record_launches()
    return {"gemv": gemv_checks(launched), "mlp": mlp_checks(launched)}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted("tests.unit.test_fp8_kernels", "interpreted_checks")


@pytest.mark.parametrize("case", range(len(GEMV_CASES)), ids=[str(case) for case in GEMV_CASES])
def test_the_gemv_matches_the_e4m3_maths_on_ragged_widths_several_rows_and_split_inputs(interpreted, case):
    out_features, _, rows, _ = GEMV_CASES[case]
    result = interpreted["gemv"][str(case)]
    assert result["launched"] == ["_fp8_gemv_kernel"] * 2  # both products came from the kernel
    assert result["shapes"] == [[rows, out_features]] * 2
    assert max(result["errors"]) < 1e-5, result  # only the order of the fp32 sums differs


@pytest.mark.parametrize("case", range(len(MLP_CASES)), ids=[str(case) for case in MLP_CASES])
def test_the_gated_mlp_kernels_compute_silu_up_scale_it_to_e4m3_and_match_the_exact_maths(interpreted, case):
    """Both of the module's paths round activations to e4m3 twice (a few percent each), so they are compared through
    the exact result, not to each other; each kernel alone is held to its own maths."""
    result = interpreted["mlp"][str(case)]
    hidden = MLP_CASES[case][0]
    parts, modules, down = result["launched"]
    assert parts == ["_gate_up_kernel", "_scale_kernel"]
    assert modules == ["_gate_up_kernel", "_scale_kernel", "_fp8_gemv_kernel"]  # one row on kernels, two on none
    assert down == ["_fp8_gemv_kernel"]  # the down Linear at one row; at two it took _scaled_mm
    assert result["h_ulps"] <= 1.01, result  # within one bf16 rounding of SiLU(gate)·up
    assert result["peaks_exact"] and result["q_exact"] and result["scale_exact"], result
    assert result["shape_dtype"] == [[1, 1, hidden], str(torch.bfloat16)]
    assert result["linears"] < 0.1 and result["kernels"] < 1.1 * result["linears"] + 1e-3, result
    assert result["down"] < 2**-8, result  # the same e4m3 maths, rounded once to bf16 on each path
