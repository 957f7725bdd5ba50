"""NF4 dequantization of a bitsandbytes 4-bit weight in one Triton kernel.

bitsandbytes stores a QLoRA base weight as 4-bit codes, two to a byte (the first value in the
high nibble), one absmax per block of 64 values; with double quantization (loraforge's QLoRA
setting) those absmax values are themselves 8-bit codes into a 256-entry table, one fp32
scale per 256 of them, plus one offset. ``bitsandbytes.functional.dequantize_4bit`` undoes
that in three kernels: the absmax codes to fp32, the offset added, then the weight. The fused
LoRA layers dequantize each base weight in every forward and backward (QLoRA keeps no dense
copy), and again where a layer is recomputed: at least 14 times a Llama layer per step.

The kernel here does it in one pass: each program reads its bytes, the absmax codes of their
blocks and the two small tables, and writes the dense weight; same arithmetic as bitsandbytes
(the absmax as ``code[q] * scale + offset`` in fp32, then ``nf4[q] * absmax``, rounded once to
the compute dtype), bitwise the same output. Why our own: one launch instead of three and no
fp32 absmax tensor in memory. On an H200 (``scripts/nf4_probe.py``, Llama-3-8B's weights) it
takes 0.048-0.052 ms for a gate/up/down weight against bitsandbytes' 0.074-0.080 (2.8-3.1 against
1.9-2.0 TB/s), 16-18 ms of a QLoRA step's dequantizations against 27, and the lean QLoRA step
gains 1.7% (docs/BENCHMARKS.md, issue 7, seventh pass). ``train.nf4_kernel: false`` keeps
bitsandbytes' own.

Triton is optional: without it, off CUDA, or for a layout the kernel does not cover (another
4-bit type, an odd block size, bitsandbytes' transposed packing, tables on another device),
``dequantize`` calls bitsandbytes. The NF4 table is the quantization state's (``state.code``,
from the checkpoint where it was saved), where bitsandbytes' CUDA kernel has it built in. On a
CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the CPU
tests check it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: bitsandbytes' own dequantization (or none: QLoRA is CUDA only)
    triton = tl = None

AVAILABLE = triton is not None
BLOCK_BYTES = 1024  # packed bytes per program: 2,048 values, 4 KiB of bf16 written
NUM_WARPS = 4


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def covered(data: torch.Tensor, state) -> str | None:
    """Why the kernel does not take this weight (None: it does)."""
    if not AVAILABLE:
        return "triton is not installed"
    if not (data.is_cuda or _interpreted()):
        return "not on a CUDA device"
    if state.quant_type != "nf4":
        return f"4-bit type {state.quant_type}"
    if state.blocksize % 2:
        return f"block size {state.blocksize}"
    if math.prod(state.shape) % 2:
        return "an odd number of values"
    if state.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {state.dtype}"
    if data.dim() == 2 and data.shape[0] == 1:
        return "transposed packing"  # bitsandbytes answers it with the transposed weight
    if data.numel() * data.element_size() < math.prod(state.shape) // 2:
        return "fewer packed bytes than values / 2"
    tables = [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code] if state.nested else [])
    if any(getattr(t, "device", data.device) != data.device for t in tables):
        return "quantization state on another device"
    return None


@functools.cache
def _kernel():
    """Built on first use, so that a test can ask for the interpreter before it is."""

    @triton.jit
    def nf4_dequantize(packed_ptr, absmax_ptr, code2_ptr, scale2_ptr, offset_ptr, nf4_ptr, out_ptr, n_bytes,
                       HALF_BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=ok, other=0).to(tl.int32)
        block = offs // HALF_BLOCK  # a block of 2 * HALF_BLOCK values: HALF_BLOCK bytes
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
            scale = tl.load(scale2_ptr + block // BLOCK2, mask=ok, other=0.0)
            # product, then sum, each rounded as bitsandbytes' two kernels do (launched without
            # fp fusion: one fused multiply-add would round once and differ in the last bit)
            absmax = tl.load(code2_ptr + q, mask=ok, other=0.0) * scale + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=ok, other=0.0)
        high = tl.load(nf4_ptr + (byte >> 4), mask=ok, other=0.0) * absmax
        low = tl.load(nf4_ptr + (byte & 15), mask=ok, other=0.0) * absmax
        values = tl.interleave(high, low)  # value 2i from byte i's high nibble, 2i + 1 from its low
        outs = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + outs, values.to(out_ptr.dtype.element_ty), mask=(outs >> 1) < n_bytes)

    return nf4_dequantize


def dequantize(data: torch.Tensor, state, use_kernel: bool = True, block: int = BLOCK_BYTES, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """The dense weight (``state.shape``, ``state.dtype``) of a bitsandbytes 4-bit weight:
    ``data`` is its packed storage (uint8, or another dtype's bytes as FSDP shards it).
    ``block`` bytes and ``num_warps`` a program: the probe's sweep found 512-2,048 bytes and
    2-4 warps within 5% of each other."""
    if not use_kernel or covered(data, state) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(data, state)
    return dequantize_covered(data, state, block, num_warps)


def dequantize_covered(data: torch.Tensor, state, block: int = BLOCK_BYTES, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """``dequantize`` by the kernel, for a weight that ``covered`` has taken: a caller that
    dequantizes the same weights every step (``fused_lora``) checks once, not per call (~9 us
    each, 448 calls a QLoRA step of an 8B)."""
    packed = data.reshape(-1).view(torch.uint8)  # FSDP's bf16 containers: the same bytes
    out = torch.empty(state.shape, dtype=state.dtype, device=data.device)
    n_bytes = out.numel() // 2
    nested = bool(state.nested)
    absmax = state.absmax
    code2 = state.state2.code if nested else absmax  # unused when not nested
    scale2 = state.state2.absmax if nested else absmax
    offset = torch.as_tensor(state.offset, dtype=torch.float32, device=data.device).reshape(1) if nested else absmax
    grid = (triton.cdiv(n_bytes, block),)
    with torch.cuda.device(data.device) if data.is_cuda else contextlib.nullcontext():  # Triton launches on the current device
        _kernel()[grid](packed, absmax, code2, scale2, offset, state.code.to(data.device, torch.float32), out, n_bytes,
                        HALF_BLOCK=state.blocksize // 2, BLOCK2=state.state2.blocksize if nested else 1, NESTED=nested,
                        BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)
    return out
