"""A candidate Triton int4 GEMV for batch-1 decode: NOT used by quantflow yet (slower than tinygemm, see below).

Why try one: at one token per step a decoder is bound by reading its weights, and PyTorch's
tinygemm op, which ``quantflow.int4`` uses, reads them at about half an H100's bandwidth
(``bench/gemv.py``). This is the textbook weight-only GEMV (as GemLite's) on compressed-tensors'
own layout (int32 ``[N, K / 8]``, eight nibbles along K, lowest first, stored as q + 8; per group
``w = (u - 8) * scale + zero``): each program owns ``BLOCK_N`` output rows and walks K in
``BLOCK_K`` steps, loading each int32 once and taking its eight nibbles in turn against the
matching activations.

Status, measured 2026-11-26 on an H100 (bench/results/gemv-h100.json):
- 30-35% of the bandwidth on the 7B shapes at batch 1 vs tinygemm's 53-55%; far slower at batch 8.
- Correct against the dequantized reference under ``TRITON_INTERPRET=1`` on CPU, but on the GPU
  a tiny 256-wide layer (group 32, zero points) gave 30% relative error: not yet found why.
- Likely next steps: the stride-8 activation loads (one per weight value) and the per-block
  scale gathers dominate; a block-interleaved packing (nibble j of word w holds k = j * GROUP + w
  within a block of 8 groups) makes activation loads contiguous and scales one per row and nibble.
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
    """The candidate kernel behind a Linear's interface, built like ``quantflow.int4.Int4Linear.from_unsigned``."""

    def __init__(self, unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group_size = *unsigned.shape, group_size
        packed = torch.zeros(self.out_features, self.in_features // 8, dtype=torch.int32, device=unsigned.device)
        for nibble in range(8):
            packed |= unsigned.to(torch.int32)[:, nibble::8] << (4 * nibble)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("zero", zero.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        _gemv[lambda meta: (x.shape[0], triton.cdiv(self.out_features, meta["BLOCK_N"]))](
            x, self.packed, self.scale, self.zero, y, x.shape[0], self.out_features, self.in_features, GROUP=self.group_size)
        return y
