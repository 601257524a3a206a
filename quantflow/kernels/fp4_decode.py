"""The Triton decode kernel of ``quantflow.kernels.fp4`` (layout and method there): FP4 codes unpacked in registers,
even and odd K positions multiplied against the activations' even and odd columns."""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def e2m1(nibble):
    """A 4-bit code's E2M1 value in float32, computed from its bits (no table in memory)."""
    index = nibble & 7
    exponent = index >> 1
    mantissa = (index & 1).to(tl.float32) * 0.5
    normal = (1.0 + mantissa) * tl.exp2((exponent - 1).to(tl.float32))
    value = tl.where(exponent == 0, mantissa, normal)
    return tl.where((nibble & 8) != 0, -value, value)


@triton.jit
def group_scale(byte, E8M0: tl.constexpr):
    """A scale byte's value in float32, built from its bits: E8M0 ``2^(s - 127)``, else FP8 E4M3 (bias 7)."""
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
    y = (acc / divisor[:, None]).to(tl.bfloat16)
    tl.store(out + offs_r[None, :] * n + offs_n[:, None], y, mask=live_n[:, None] & live_r[None, :])


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
