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

In an offloaded layer's recomputation (``memory.Kept``) the attention is not computed again:
the first forward keeps q, k, v and the kernel's outputs (its log-sum-exp included), and the
recomputation hands them to the same kernel call's autograd node, so backward runs the kernel's
own backward on the values of the first forward (``_Record`` / ``_Replay``). The inputs that
arrive in the recomputation only carry the gradient back (``_Substitute``): their values are
not read, which lets ``fused_lora`` skip the q/k/v matmuls there.

The function is registered with transformers' attention interface under ``NAME``; a model
loaded with ``attn_implementation=NAME`` reads the sample boundaries from the keyword
arguments of its forward (``flat_kwargs``), which transformers passes down to every layer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from loraforge.train import memory

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
    kept = memory.kept()
    if kept is None:
        return _attend(query, key, value, cu, max_len, scaling), None
    if kept.recording:
        with _Record() as record:
            out = _attend(query, key, value, cu, max_len, scaling)
        leaves, spec = pytree.tree_flatten(record.outputs)
        # ``out`` is a view of the kept output, copied out after the block: nothing may write it in place
        kept.add("attention", [query, key, value, *leaves], spec)
        return out, None
    taken = kept.take("attention")
    if taken is None:  # nothing kept for this call: computed again
        return _attend(query, key, value, cu, max_len, scaling), None
    values, spec = taken
    query, key, value = (_Substitute.apply(t, v) for t, v in zip((query, key, value), values[:3]))
    with _Replay(pytree.tree_unflatten(values[3:], spec)) as replay:
        out = _attend(query, key, value, cu, max_len, scaling)
    if replay.outputs or replay.missed:
        _warn_once("the attention kernel of a recomputation was not the first forward's: computed again (correct, slower)")
    return out, None


def _attend(query, key, value, cu, max_len: int, scaling):
    samples, tokens = cu.shape[0] - 1, query.shape[2]
    if samples * max_len == tokens:  # no sample is shorter than the longest: whole rows
        return _sdpa_rows(query, key, value, samples, scaling)
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))  # (T, H, D)
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu, max_len, scaling)
    else:
        out = _sdpa_per_sample(q, k, v, cu, scaling)
    return out.unsqueeze(0)


# The kernels behind SDPA and torch's varlen_attn whose outputs (output, log-sum-exp, RNG
# state, ...) their autograd node keeps for backward.
_KERNELS = frozenset(
    {
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "torch_attn::_varlen_attn",
    }
)


class _Record(TorchDispatchMode):
    """Runs the attention, keeping every ``_KERNELS`` call's outputs. The first forward runs
    without autograd, where SDPA asks cuDNN and the memory-efficient kernel for no log-sum-exp;
    it is asked for here, as backward needs it."""

    def __init__(self):
        super().__init__()
        self.outputs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name not in _KERNELS:
            return func(*args, **kwargs)
        for i, argument in enumerate(func._schema.arguments):
            if argument.name == "compute_log_sumexp":
                if i < len(args):
                    args = (*args[:i], True, *args[i + 1 :])
                else:
                    kwargs = {**kwargs, argument.name: True}
        out = func(*args, **kwargs)
        self.outputs.append((_call_key(func, args), pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, out)))
        return out


class _Replay(TorchDispatchMode):
    """Answers the ``_KERNELS`` calls with the recorded outputs, the n-th call with the n-th
    recorded one, instead of running them (autograd above records its node as usual); a call
    that is not the recorded one (another kernel, other shapes) runs, and so does anything else."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs = list(outputs)
        self.missed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _KERNELS:
            key, out = self.outputs.pop(0) if self.outputs else (None, None)
            if key == _call_key(func, args):
                return out
            self.missed += 1
        return func(*args, **(kwargs or {}))


def _call_key(func, args) -> tuple:
    """A kernel call told apart from another: its name and its tensors' shapes."""
    return (func._schema.name, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))


class _Substitute(torch.autograd.Function):
    """``kept``'s values in forward, the gradient passed straight to ``x`` in backward: x is the
    recomputation's tensor, equal to ``kept`` in value (which is not read)."""

    @staticmethod
    def forward(ctx, x, kept):
        return kept

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


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
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, n, D): 4D goes to a fused CPU kernel
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).squeeze(0).transpose(0, 1))
    return torch.cat(outs)
