"""The Triton kernels of ``quantflow.kernels.fp4`` (layout and method there): the decode product, FP4 codes unpacked
in registers with even and odd K positions multiplied against the activations' even and odd columns, and the
dequantization to bf16 for longer inputs. Values are built from their bits (no table, no ``exp2``), so exact."""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def e2m1(nibble):
    """A 4-bit code's E2M1 value in float32, from its bits: ``(1 + m/2) * 2^(e - 1)``, or ``m/2`` when ``e == 0``."""
    exponent = (nibble >> 1) & 3
    mantissa = nibble & 1
    normal = ((exponent + 126) << 23 | mantissa << 22).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, normal)
    return tl.where((nibble & 8) != 0, -value, value)


@triton.jit
def group_scale(byte, E8M0: tl.constexpr):
    """A scale byte's value in float32, built from its bits: E8M0 ``2^(s - 127)``, else FP8 E4M3 (bias 7). E8M0's
    byte 0 reads as 0 (not 2^-127) and 255 as infinity (not NaN): a group with such a scale has no usable values."""
    if E8M0:
        return (byte << 23).to(tl.float32, bitcast=True)
    exponent = (byte >> 3) & 15
    mantissa = byte & 7
    normal = ((exponent + 120) << 23 | mantissa << 20).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    return tl.where((byte & 128) != 0, -value, value)


@triton.jit
def decode(x, packed, scale, global_scale, out, rows, n, groups, K_HALF: tl.constexpr,
           GROUP_HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, ROWS: tl.constexpr,
           E8M0: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """``out[rows, n] = x[rows, 2 * K_HALF] @ W^T`` for one block of ``BLOCK_N`` outputs, rows padded to ``ROWS``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    live_n, live_r = offs_n < n, offs_r < rows
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for start in range(0, K_HALF, BLOCK_KH):  # K per layer: a constant
        offs_k = start + tl.arange(0, BLOCK_KH)
        codes = tl.load(packed + offs_n[:, None] * K_HALF + offs_k[None, :], mask=live_n[:, None], other=0)
        codes = codes.to(tl.int32)
        byte = tl.load(
            scale + offs_n[:, None] * groups + (offs_k // GROUP_HALF)[None, :], mask=live_n[:, None], other=0
        )
        group = group_scale(byte.to(tl.int32), E8M0)
        even = (e2m1(codes & 15) * group).to(tl.bfloat16)
        odd = (e2m1(codes >> 4) * group).to(tl.bfloat16)
        where = x + offs_r[None, :] * (2 * K_HALF) + 2 * offs_k[:, None]
        x_even = tl.load(where, mask=live_r[None, :], other=0.0)
        x_odd = tl.load(where + 1, mask=live_r[None, :], other=0.0)
        if INTERPRET:  # the CPU interpreter multiplies bf16 tiles as their raw bits: give it fp32 (exact)
            acc += tl.dot(even.to(tl.float32), x_even.to(tl.float32)) + tl.dot(odd.to(tl.float32), x_odd.to(tl.float32))
        else:
            acc += tl.dot(even, x_even) + tl.dot(odd, x_odd)
    divisor = tl.load(global_scale + offs_n, mask=live_n, other=1.0)
    y = tl.math.div_rn(acc, divisor[:, None]).to(tl.bfloat16)
    tl.store(out + offs_r[None, :] * n + offs_n[:, None], y, mask=live_n[:, None] & live_r[None, :])


@triton.jit
def dequantize(packed, scale, global_scale, out, n, groups, K_HALF: tl.constexpr, GROUP_HALF: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, E8M0: tl.constexpr):  # fmt: skip
    """``out[n, 2 * K_HALF]`` in bf16 for one [BLOCK_N, 2 * BLOCK_KH] tile: each value times its group's scale over
    the row's global scale, in float32 as compressed-tensors computes it, rounded once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_KH + tl.arange(0, BLOCK_KH)
    live = (offs_n < n)[:, None]
    codes = tl.load(packed + offs_n[:, None] * K_HALF + offs_k[None, :], mask=live, other=0).to(tl.int32)
    byte = tl.load(scale + offs_n[:, None] * groups + (offs_k // GROUP_HALF)[None, :], mask=live, other=0)
    divisor = tl.load(global_scale + offs_n, mask=offs_n < n, other=1.0)
    factor = tl.math.div_rn(group_scale(byte.to(tl.int32), E8M0), divisor[:, None])
    where = out + offs_n[:, None] * (2 * K_HALF) + 2 * offs_k[None, :]
    tl.store(where, (e2m1(codes & 15) * factor).to(tl.bfloat16), mask=live)
    tl.store(where + 1, (e2m1(codes >> 4) * factor).to(tl.bfloat16), mask=live)


@torch.library.triton_op("quantflow::fp4_dequantize", mutates_args={})
def fp4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, group: int, e8m0: bool, block_k: int
) -> torch.Tensor:
    """The bf16 weight [N, K] for the long-input path's cuBLAS product (no int64 index or float32 copy per weight,
    as a gather through a table would make)."""
    n, k_half = packed.shape
    out = torch.empty(n, 2 * k_half, dtype=torch.bfloat16, device=packed.device)
    torch.library.wrap_triton(dequantize)[(triton.cdiv(n, 64), k_half // block_k)](
        packed, scale, global_scale, out, n, scale.shape[1],
        K_HALF=k_half, GROUP_HALF=group // 2, BLOCK_N=64, BLOCK_KH=block_k, E8M0=e8m0,
    )  # fmt: skip
    return out


@torch.library.triton_op("quantflow::fp4_decode", mutates_args={})
def fp4_decode(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    group: int,
    e8m0: bool,
    block_n: int,
    block_k: int,
    pad: int,
) -> torch.Tensor:
    """``x @ W^T`` in bf16 for bf16 ``x`` [rows <= pad, K] and an FP4 weight given by its tensors, the rows padded to
    ``pad`` for the tensor cores (a custom op, so that torch.compile and CUDA graphs take the kernel as one node)."""
    rows, k = x.shape
    n = packed.shape[0]
    out = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    torch.library.wrap_triton(decode)[(triton.cdiv(n, block_n),)](
        x, packed, scale, global_scale, out, rows, n, scale.shape[1],
        K_HALF=k // 2, GROUP_HALF=group // 2, BLOCK_N=block_n, BLOCK_KH=block_k, ROWS=pad, E8M0=e8m0,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
    )  # fmt: skip
    return out
