"""The LoRA expand with the adapter mask fused in: one Triton kernel per module group and layer.

``lora.AdapterBank`` in ``fused`` mode gets each token row's LoRA input ``h = x @ A.T`` from
the base matmul itself (A's rows are stored under the base weight's), so what is left is the
expand, for token rows ``t`` whose adapter slot is ``slot[t]``:

    out[t, :] += h[t, rows of slot[t]] @ B[rows of slot[t], :]      (slot 0, the base: nothing)

with ``rows of s`` = ``(m * K + s) * R + j`` for the group's modules ``m`` and ``j < R`` (the
layout in ``lora``'s docstring). The torch form of the same is
``out.addmm_(h * onehot_mask(slot), B)``: three kernels, and a matmul over every loaded
adapter's rows. The kernel is one launch; a program owns a tile of rows x output columns,
loops over the adapter slots present in its rows (a slot absent from the tile costs one
reduction, no reads) and, within a slot, over the modules its columns belong to (B is block
diagonal: module m's rows are zero outside module m's columns, so a tile that straddles two
modules just adds both). Reads B only for the slots in the batch; accumulates in fp32 and
rounds once into ``out``, as ``addmm_`` does. ``out`` and ``h`` may be strided views (they
are column slices of the base matmul's output).

Triton is optional: without it (CPU, or an install without triton) ``AVAILABLE`` is False and
the bank uses the torch form; importing this module never fails.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the bank falls back to torch
    triton = tl = None

AVAILABLE = triton is not None
BLOCK_N = 64  # output columns per program: 448 programs for an 8B model's gate_up (28,672 columns)
MAX_BLOCK_T = 64  # token rows per program: all of a 64-stream decode step, so B is read once a step


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """The Triton kernel runs here: a CUDA device, 16-bit weights (fp32 stays on torch's exact path)."""
    return AVAILABLE and torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)


if AVAILABLE:

    @triton.jit
    def _expand_kernel(out_ptr, h_ptr, b_ptr, slot_ptr, T, N, K, R, c1, c2,
                       stride_ot, stride_on, stride_ht, stride_hr, stride_br, stride_bn,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        first = tl.program_id(1) * BLOCK_N
        cols = first + tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_R)
        row_ok, col_ok, rank_ok = rows < T, cols < N, j < R
        slots = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        last = tl.minimum(first + BLOCK_N, N) - 1
        m_first = (first >= c1).to(tl.int32) + (first >= c2).to(tl.int32)  # module of the tile's first column
        m_last = (last >= c1).to(tl.int32) + (last >= c2).to(tl.int32)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for s in range(1, K):
            rows_of_s = row_ok & (slots == s)
            if tl.sum(rows_of_s.to(tl.int32), axis=0) > 0:
                for m in range(m_first, m_last + 1):
                    start = (m * K + s) * R
                    h = tl.load(h_ptr + rows[:, None] * stride_ht + (start + j)[None, :] * stride_hr,
                                mask=rows_of_s[:, None] & rank_ok[None, :], other=0.0)
                    b = tl.load(b_ptr + (start + j)[:, None] * stride_br + cols[None, :] * stride_bn,
                                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
                    acc += tl.dot(h, b)
        adapted = row_ok & (slots > 0)  # base rows are neither read nor written
        mask = adapted[:, None] & col_ok[None, :]
        ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on
        before = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (before.to(tl.float32) + acc).to(before.dtype), mask=mask)


def expand_(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, slot: torch.Tensor, K: int, R: int,
            bounds: tuple[int, ...]) -> torch.Tensor:
    """``out[t] += h[t, rows of slot[t]] @ B[rows of slot[t]]`` in place, by the Triton kernel.

    ``out`` [T, N] and ``h`` [T, n * K * R] (any strides), ``B`` [n * K * R, N], ``slot`` [T]
    (integer); ``bounds``: the first output column of each module after the first (for q/k/v:
    ``(q, q + k)``). Any T (one launch; rows in tiles of up to 64), any R (tiles of the next
    power of two, at least 16: ``tl.dot``'s smallest).
    """
    T, N = out.shape
    if T == 0 or K < 2 or R == 0:
        return out
    c1, c2 = (*bounds, N, N)[:2]
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))
    block_r = max(16, triton.next_power_of_2(R))
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, BLOCK_N))
    _expand_kernel[grid](out, h, B, slot, T, N, K, R, c1, c2, out.stride(0), out.stride(1), h.stride(0), h.stride(1),
                         B.stride(0), B.stride(1), BLOCK_T=block_t, BLOCK_N=BLOCK_N, BLOCK_R=block_r)
    return out
