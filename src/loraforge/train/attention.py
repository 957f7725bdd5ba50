"""Padding-free attention: the samples of a micro-batch in one flat row, each attending to itself.

A packed micro-batch is one row of concatenated samples; ``cu_seqlens`` (0, end of sample 1,
end of sample 2, ...) says where each starts, and the kernel confines attention to each sample,
causally. No padding token is computed, no (L x L) mask is built: the plain recipe's 4D mask
sends PyTorch SDPA to its masked (slower) kernel and grows quadratically with the row.

On CUDA this is PyTorch's own flash-attention varlen kernel (``torch.nn.attention.varlen``,
no extra package). Elsewhere (CPU tests, tiny models) the same call runs SDPA once per sample:
exact, slow, the reference the GPU path is checked against.

When every sample of the micro-batch has the same length (long-context data cut to
``max_seq_length``, the dense benchmark case) the flat row is whole rows of one sample each:
it is viewed as (samples, length) and goes through SDPA's causal kernel, cuDNN's first where
it runs. Measured on an H200 (2 x 4,096 tokens, 32 heads, 8 KV heads, forward + backward):
cuDNN 2.0 ms, the flash varlen kernel 3.6 ms (docs/BENCHMARKS.md, issue 7). cuDNN's own
varlen entry point is not used: in torch 2.11 it was 10x slower and its gradients were wrong.

The function is registered with transformers' attention interface under ``NAME``; a model
loaded with ``attn_implementation=NAME`` reads the sample boundaries from the keyword
arguments of its forward (``flat_kwargs``), which transformers passes down to every layer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

NAME = "loraforge_varlen"


def register() -> str:
    """Make ``NAME`` a valid ``attn_implementation`` (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _no_mask)  # boundaries come from cu_seqlens, not a mask
    return NAME


def _no_mask(*args, **kwargs):
    return None


def available(device: torch.device) -> bool:
    """The flash varlen kernel runs here (CUDA, a torch that has it)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flat_kwargs(cu_seqlens: torch.Tensor, max_len: int) -> dict:
    """The forward keyword arguments that carry sample boundaries (transformers' names for them)."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_len, "max_length_k": max_len}


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention signature: q (1, H, T, D), k/v (1, H_kv, T, D) -> ((1, T, H, D), None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"{NAME} attention needs cu_seq_lens_q / max_length_q in the forward's keyword arguments (train.batch.flat_kwargs)")
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} attention takes one flat row of packed samples, got a batch of {query.shape[0]}")
    max_len = int(kwargs["max_length_q"])
    samples, tokens = cu.shape[0] - 1, query.shape[2]
    if samples * max_len == tokens:  # no sample is shorter than the longest: whole rows
        return _sdpa_rows(query, key, value, samples, scaling), None
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))  # (T, H, D)
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu, max_len, scaling)
    else:
        out = _sdpa_per_sample(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


@functools.cache
def _varlen_call():
    """torch's varlen_attn and the keywords this torch version takes for causal GQA attention."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


def _flash_varlen(q, k, v, cu, max_len, scale):
    # Grouped K/V heads go in as they are: the flash kernel reads each group's K/V head itself,
    # also where the API has no enable_gqa switch (torch 2.11: same output as repeated heads,
    # checked on the H200), so no repeated copy of K and V is made or kept for backward.
    varlen_attn, kwargs = _varlen_call()
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kwargs)


@functools.cache
def _row_backends():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_rows(query, key, value, samples: int, scale):
    """(1, H, samples x L, D) of equal-length samples -> (1, samples x L, H, D), causal per sample."""
    from torch.nn.attention import sdpa_kernel

    # views throughout, squeeze rather than [0]: indexing's backward writes the gradient into a
    # fresh zero tensor in (1, H, T, D) order, which the rope's backward then copies again to
    # its own order; a view's backward keeps the attention kernel's gradient layout (H200, 8B
    # shape: ~9 ms of copies a step)
    q, k, v = (t.squeeze(0).unflatten(1, (samples, -1)).transpose(0, 1) for t in (query, key, value))  # (n, H, L, D)
    gqa = k.shape[1] != q.shape[1]
    with sdpa_kernel(_row_backends(), set_priority=True) if q.is_cuda else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(1, -1, q.shape[1], q.shape[3])


def _sdpa_per_sample(q, k, v, cu, scale):
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)
