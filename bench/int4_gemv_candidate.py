"""Candidate Triton int4 GEMVs for batch-1 decode: measured, slower than tinygemm, NOT used by quantflow.

Why try one: at one token per step a decoder is bound by reading its weights, and PyTorch's
tinygemm op, which ``quantflow.int4`` uses, reads them at about half an H100's bandwidth
(``bench/gemv.py``). Both kernels here are the textbook weight-only GEMV (as GemLite's): each
program owns ``BLOCK_N`` output rows, walks K, and applies per-group scales and zeros
(``w = (u - 8) * scale + zero``, u the stored nibble).

``CandidateLinear`` (v1) reads compressed-tensors' own layout (int32 ``[N, K / 8]``, eight nibbles
along K, lowest first) and takes each word's eight nibbles in turn. Measured 2026-11-26 on an H100
(bench/results/gemv-h100.json): 30-35% of the bandwidth on the 7B shapes at batch 1 vs tinygemm's
44-55%, far slower at batch 8. Correct under ``TRITON_INTERPRET=1`` on CPU, but on the GPU a tiny
256-wide layer (group 32, zero points) gave 30% relative error: not yet found why.

``InterleavedLinear`` (v2) repacks for
the kernel: K is cut into blocks of eight groups, and nibble j of word w in a block holds value
``j * group + w``. Each nibble of a block then covers one whole group, so the activations it
multiplies are one contiguous load and its scale and zero are one value per row, where v1 needs
a strided activation load per weight value and a scale gather per word. K is padded to a multiple
of 8 groups (2% at the 7B shapes, more for narrow models).

Status, 2026-11-26, H100 (bench/results/gemv-survey-h100.json, docs/benchmarks.md "Int4 kernel
survey"): at group 128 both are correct on the GPU (0.24% error) and both are slower than tinygemm
at batch 1 (4096 x 4096: v1 8.9 us, v2 10.3 us, tinygemm 5.9 us) and far slower at batch 8.
Kept as the bench's record of what was tried. The next thing to try would be splitting the input
dimension across programs, as GemLite's batch-1 kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n in (2, 4, 8, 16) for k in (256, 512, 1024) for w in (2, 4)]


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)  # the token; programs of one weight block run side by side, so M > 1 re-reads it from L2
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    words_per_row = K // 8
    groups = K // GROUP
    acc = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)  # reduced once at the end
    for k0 in range(0, K, BLOCK_K):
        word = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        word_mask = word < words_per_row
        mask = col_mask[:, None] & word_mask[None, :]
        words = tl.load(w_ptr + cols[:, None] * words_per_row + word[None, :], mask=mask, other=0)  # contiguous, read once
        group = cols[:, None] * groups + (word * 8 // GROUP)[None, :]  # a word's eight values share one group
        scale = tl.load(s_ptr + group, mask=mask, other=0).to(tl.float32)
        zero = tl.load(z_ptr + group, mask=mask, other=0).to(tl.float32)
        dot = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        x_sum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for nibble in tl.static_range(8):  # value k = 8 * word + nibble sits in bits 4 * nibble
            x = tl.load(x_ptr + row * K + word * 8 + nibble, mask=word_mask, other=0).to(tl.float32)
            dot += (((words >> (4 * nibble)) & 0xF).to(tl.float32) - 8.0) * x[None, :]
            x_sum += x
        acc += dot * scale + zero * x_sum[None, :]
    tl.store(y_ptr + row * N + cols, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=col_mask)


class CandidateLinear(torch.nn.Module):
    """v1 behind a Linear's interface, built like ``quantflow.int4.Int4Linear.from_unsigned``."""

    def __init__(self, unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group_size = *unsigned.shape, group_size
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        self.register_buffer("packed", pack_to_int32((unsigned - 8).to(torch.int8), 4))  # the library's own layout
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("zero", zero.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        _gemv[lambda meta: (x.shape[0], triton.cdiv(self.out_features, meta["BLOCK_N"]))](
            x, self.packed, self.scale, self.zero, y, x.shape[0], self.out_features, self.in_features, GROUP=self.group_size)
        return y


def _interleaved_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n in (2, 4, 8, 16) for w in (1, 2, 4) for st in (2, 3)]


@triton.autotune(configs=_interleaved_configs(), key=["M", "N", "K"])
@triton.jit
def _gemv_interleaved(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, PADDED_K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    lanes = tl.arange(0, GROUP)
    groups = PADDED_K // GROUP
    acc = tl.zeros([BLOCK_N, GROUP], dtype=tl.float32)
    zero_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in tl.range(0, PADDED_K // (8 * GROUP)):
        words = tl.load(w_ptr + cols[:, None] * (PADDED_K // 8) + (block * GROUP + lanes)[None, :], mask=col_mask[:, None], other=0)
        for nibble in tl.static_range(8):
            k = block * 8 * GROUP + nibble * GROUP + lanes
            x = tl.load(x_ptr + row * K + k, mask=k < K, other=0).to(tl.float32)
            group = cols * groups + block * 8 + nibble
            scale = tl.load(s_ptr + group, mask=col_mask, other=0).to(tl.float32)
            zero = tl.load(z_ptr + group, mask=col_mask, other=0).to(tl.float32)
            acc += ((words >> (4 * nibble)) & 0xF).to(tl.float32) * (x[None, :] * scale[:, None])
            zero_acc += (zero - 8.0 * scale) * tl.sum(x, axis=0)
    tl.store(y_ptr + row * N + cols, (tl.sum(acc, axis=1) + zero_acc).to(y_ptr.dtype.element_ty), mask=col_mask)


class InterleavedLinear(torch.nn.Module):
    """v2 behind a Linear's interface: repacks u ([out, in], 0..15) into blocks of eight groups, one group per nibble."""

    def __init__(self, unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group_size = *unsigned.shape, group_size
        block = 8 * group_size
        self.padded = -(-self.in_features // block) * block
        pad = self.padded - self.in_features
        values = torch.nn.functional.pad(unsigned.to(torch.int32), (0, pad)).view(self.out_features, -1, 8, group_size)
        packed = torch.zeros(self.out_features, self.padded // block, group_size, dtype=torch.int32, device=unsigned.device)
        for nibble in range(8):
            packed |= values[:, :, nibble, :] << (4 * nibble)
        self.register_buffer("packed", packed.view(self.out_features, -1))
        self.register_buffer("scale", torch.nn.functional.pad(scale, (0, pad // group_size)).to(torch.bfloat16).contiguous())
        self.register_buffer("zero", torch.nn.functional.pad(zero, (0, pad // group_size)).to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        _gemv_interleaved[lambda meta: (x.shape[0], triton.cdiv(self.out_features, meta["BLOCK_N"]))](
            x, self.packed, self.scale, self.zero, y, x.shape[0], self.out_features, self.in_features, self.padded, GROUP=self.group_size)
        return y
