"""How much to recompute: a memory planner for activation checkpointing, and offloading.

Checkpointing a decoder layer keeps only its input for backward and runs the layer again
there: about a third more compute for that layer, for a fraction of its activations. The
plain switch checkpoints every layer or none. The planner spends the memory budget instead:
it starts from the bytes that do not depend on the choice (weights, LoRA and AdamW state,
the loss's working set) and leaves as many layers un-checkpointed as the budget allows
(recompute only what does not fit). When even checkpointing every layer does not fit, the
checkpointed inputs go to pinned CPU memory (activation offloading) and come back in
backward. ``loraforge train --dry-run`` prints the plan.

Estimates per token and layer, for a Llama-class decoder with hidden size h, K/V width kv,
MLP width m and b bytes per value (what autograd keeps for backward):
  not checkpointed  (8h + 2kv + 4m) b    norms, q/k/v/o and their LoRA inputs, MLP in/out
  checkpointed      h b                  the layer's input (offloaded by blocks: 2 h b, in CPU memory)
  recomputing       (8h + 2kv + 4m) b    one layer at a time, in backward
  kept attention    (2h + 2kv) b + 4 H   q, k, v, the attention's output and its fp32 log-sum-exp
                                         (H heads), in CPU memory (``Kept``)
"""

from __future__ import annotations

import functools
import weakref
from contextvars import ContextVar
from dataclasses import dataclass

import torch

GiB = 1024**3

# Decoder layers made of two residual blocks, ``h = x + attn(norm1(x))`` then ``h + mlp(norm2(h))``,
# with the attention's output projection and the MLP's down projection the last op before each
# add (transformers 5's Llama, Mistral, Qwen2 and Qwen3 layers have this very forward).
RESIDUAL_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})


@dataclass
class MemoryPlan:
    layers: int
    checkpointed: int  # layers recomputed in backward (the first ones)
    offload: bool  # checkpointed inputs kept in pinned CPU memory
    budget: int
    estimate: dict[str, int]
    adapter_dtype: str = "fp32"  # "model": the budget holds LoRA and AdamW state only in the model's dtype
    kept_attention: bool = False  # offloaded layers keep their attention's values too (``Kept``)

    @property
    def total(self) -> int:
        return sum(self.estimate.values())

    def describe(self) -> str:
        if self.checkpointed == 0:
            what = f"no recomputation (all {self.layers} layers keep their activations)"
        elif self.checkpointed == self.layers:
            what = f"recompute all {self.layers} layers"
        else:
            what = f"recompute {self.checkpointed} of {self.layers} layers, keep the activations of {self.layers - self.checkpointed}"
        if self.offload:
            what += ", their inputs offloaded to pinned CPU memory"
            if self.kept_attention:
                what += " with their attention's values"
        if self.adapter_dtype == "model":
            what += ", LoRA weights and AdamW state in the model's dtype"
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.estimate.items() if v)
        return f"{what}: ~{self.total / GiB:.1f} GiB of a {self.budget / GiB:.1f} GiB budget ({parts})"


@dataclass
class LayerBytes:
    """Bytes per token of one decoder layer: kept without / with checkpointing, and (``kept``)
    what an offloaded layer brings back with its input when its attention is kept (``Kept``)."""

    full: int
    checkpointed: int
    kept: int = 0


def layer_bytes(config, width: int, keep_attention: bool = False) -> LayerBytes:
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = h * getattr(config, "num_key_value_heads", heads) // heads
    kept = (2 * h + 2 * kv) * width + 4 * heads if keep_attention else 0  # q, k, v, output; fp32 log-sum-exp
    return LayerBytes(full=(8 * h + 2 * kv + 4 * inter) * width, checkpointed=h * width, kept=kept)


def plan(fixed: dict[str, int], per_token: LayerBytes, layers: int, tokens: int, budget: int, checkpointing: bool | None = None, offload: bool | None = None) -> MemoryPlan:
    """The plan for ``tokens`` per micro-batch under ``budget`` bytes.

    ``fixed``: bytes that do not depend on the plan (weights, optimizer, loss working set).
    ``checkpointing``: True / False force every / no layer; None lets the budget decide.
    ``offload``: True / False force it for checkpointed layers; None: only when needed.
    """
    full, ckpt = per_token.full * tokens, per_token.checkpointed * tokens

    def estimate(k: int, off: bool) -> dict[str, int]:
        kept = (layers - k) * full
        inputs = ckpt + per_token.kept * tokens if off else k * ckpt  # offloaded: the previous layer's, fetched ahead
        working = full if k else 0  # one layer recomputed at a time
        return fixed | {"activations": kept + inputs + working}

    if checkpointing is False:
        choices = [0]
    elif checkpointing is True:
        choices = [layers]
    else:
        choices = list(range(layers + 1))  # fewest recomputed layers first
    def fits(k: int, off: bool) -> bool:
        return sum(estimate(k, off).values()) <= budget

    k = next((k for k in choices if fits(k, bool(offload) and k > 0)), choices[-1])
    # offload when asked to, or (left to the plan) when even recomputing this much does not fit
    off = k > 0 and (bool(offload) or (offload is None and not fits(k, False)))
    return MemoryPlan(layers, k, off, budget, estimate(k, off), kept_attention=off and per_token.kept > 0)


# ---- applying the plan -----------------------------------------------------------------------


def apply(model, plan: MemoryPlan, blocks: bool = False) -> None:
    """Checkpoint the first ``plan.checkpointed`` decoder layers (offloaded if planned).

    Uses transformers' per-layer switch (``GradientCheckpointingLayer.gradient_checkpointing``)
    after ``gradient_checkpointing_enable`` set every layer up, with ``recompute_checkpoint``,
    ``offloaded_checkpoint`` or (``blocks``: the fused LoRA layers skip what the blocks' own
    recomputation does not read) ``offloaded_blocks`` as the function: each says when a forward
    is the recomputation (``recomputing``), so the fused LoRA layers can skip what backward
    does not read. ``plan.kept_attention``: offloaded layers keep their attention (``Kept``).
    """
    from loraforge.train.distributed import decoder_layers

    layers = decoder_layers(model, required=False)
    if not layers:  # no known decoder layer class: transformers' checkpointing of every layer stays
        return
    keep = plan.kept_attention  # only ever with plan.offload
    run = functools.partial(offloaded_checkpoint, keep=keep) if plan.offload else recompute_checkpoint
    for i, layer in enumerate(layers):
        on = i < plan.checkpointed
        layer.gradient_checkpointing = on
        if on:
            segmented = blocks and plan.offload and type(layer).__name__ in RESIDUAL_LAYERS
            layer._gradient_checkpointing_func = functools.partial(offloaded_blocks, layer, keep=keep) if segmented else run


_recomputing: ContextVar[str] = ContextVar("loraforge_recomputing", default="")


def recomputing() -> str:
    """What runs again in backward to rebuild its graph: "" (nothing: a first forward),
    "layer" (a whole checkpointed decoder layer) or "block" (one residual block of one)."""
    return _recomputing.get()


class Kept:
    """Values that an offloaded layer's (or block's) recomputation takes from its first forward
    instead of computing them again: the attention's inputs and outputs (``attention.py``).

    The first forward (``recording``) adds entries in call order; they go to pinned CPU memory
    with the layer's input and come back with it; the recomputation takes them in the same
    order. What the attention reads is the one thing of a layer that is both costly to compute
    again and needed as values in backward: with it kept, the recomputation runs neither the
    attention kernel nor (``fused_lora``) the q/k/v matmuls, whose outputs only fed it: 161 MiB
    a layer more on the side stream's copies (8B shape, 8,192 tokens) for ~1.2 ms a layer. On an
    H200 the lean step went from 12,317 to 13,077 tokens/s at 17.6 -> 17.7 GiB
    (docs/BENCHMARKS.md, issue 7, sixth pass)."""

    def __init__(self):
        self.recording = True
        self.entries: list[tuple[str, list, object]] = []  # (tag, values to offload, what else rebuilds them)

    def add(self, tag: str, values: list, meta=None) -> None:
        self.entries.append((tag, list(values), meta))

    def pending(self, tag: str) -> bool:
        """The next entry the recomputation will take is a ``tag`` one."""
        return not self.recording and bool(self.entries) and self.entries[0][0] == tag

    def take(self, tag: str) -> tuple[list, object] | None:
        if not self.pending(tag):
            return None
        _, values, meta = self.entries.pop(0)
        return values, meta

    def values(self) -> list:
        return [v for _, values, _ in self.entries for v in values]

    def replace(self, values: list) -> None:
        """Each entry's values swapped for ``values`` (the same number, in ``values()``'s order)."""
        it = iter(values)
        self.entries = [(tag, [next(it) for _ in vs], meta) for tag, vs, meta in self.entries]


_kept: ContextVar["Kept | None"] = ContextVar("loraforge_kept", default=None)


def kept() -> "Kept | None":
    """The ``Kept`` store of the offloaded layer (or block) running now, recording in its first
    forward and taking in its recomputation; None everywhere else."""
    return _kept.get()


def recompute_checkpoint(run, hidden, *args):
    """Activation checkpointing: keep the layer's input, run the layer again in backward."""
    if args:
        raise TypeError("recompute_checkpoint takes the layer's hidden states as its only positional argument")
    return _Recompute.apply(run, hidden, False, "layer", False)


def offloaded_checkpoint(run, hidden, *args, keep: bool = False):
    """``recompute_checkpoint`` with the saved input in pinned CPU memory (CUDA), copied out
    on a side stream while the GPU computes and copied back when backward reaches the layer.
    ``keep``: with the attention's values (``Kept``)."""
    if args:
        raise TypeError("offloaded_checkpoint takes the layer's hidden states as its only positional argument")
    return _Recompute.apply(run, hidden, True, "layer", keep)


def offloaded_blocks(layer, run, hidden, *args, keep: bool = False):
    """``offloaded_checkpoint`` of a ``RESIDUAL_LAYERS`` layer block by block: the attention
    block and the MLP block each keep their input in pinned CPU memory and run again on their own.

    The attention block's output (``x + o_proj(...)``) is then needed by nothing in its
    recomputation, as the MLP's down projection is in the MLP block's: both projections skip
    their base matmul there (``fused_lora``). It costs a second offloaded input per layer (the
    residual stream between the blocks) on the side stream. ``run`` is transformers' call of the
    layer's forward with its keyword arguments bound; the blocks pass those to the attention."""
    kwargs = getattr(run, "keywords", None)
    if args or kwargs is None:
        return offloaded_checkpoint(run, hidden, *args, keep=keep)

    def attention_block(x):
        return x + layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]

    def mlp_block(h):
        return h + layer.mlp(layer.post_attention_layernorm(h))

    return _Recompute.apply(mlp_block, _Recompute.apply(attention_block, hidden, True, "block", keep), True, "block", False)


_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


_OFFLOAD_MIN_BYTES = 64 * 1024


class _Offloaded:
    """A checkpointed input (and the values ``Kept`` with it) in pinned CPU memory, and their way back.

    Backward reaches the layers (or blocks) in reverse, so when one's backward starts, the
    input of the one before it (``previous``) is copied back on the side stream while this one
    computes: the copy to the GPU is off the critical path as the copy out is in forward (a
    blocking copy back cost ~39 ms of a ~740 ms step on the H200, 8B shape, 32 layers)."""

    def __init__(self, hidden: torch.Tensor, previous: "_Offloaded | None"):
        self.device = hidden.device
        # weak: only the autograd graph keeps an offloaded input alive (a forward that never
        # reaches backward frees its inputs with its graph)
        self.previous = weakref.ref(previous) if previous is not None else None
        self.back: list | None = None  # the values again on the GPU, once fetched
        self.fetched: torch.cuda.Event | None = None
        self.cpu: list | None = []
        self.moved: list[bool] = []
        self.add([hidden], min_bytes=0)

    def add(self, values: list, min_bytes: int = _OFFLOAD_MIN_BYTES) -> None:
        """Copy ``values`` out too (on the side stream, after what the GPU has queued so far);
        GPU tensors under ``min_bytes`` stay where they are (a kernel's RNG state, empty
        placeholders, a short row's log-sum-exp: a copy's fixed cost for little)."""
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for value in values:
            move = isinstance(value, torch.Tensor) and value.is_cuda and value.nbytes >= min_bytes
            if move:  # a dense tensor keeps its strides: kernels get back the layout they wrote
                cpu = torch.empty_like(value, device="cpu", pin_memory=True)
                with torch.cuda.stream(stream):
                    cpu.copy_(value.detach(), non_blocking=True)
                value.record_stream(stream)  # its memory is not reused before the copy is done
                value = cpu
            elif isinstance(value, torch.Tensor):
                value = value.detach()  # kept as it is, outside the graph that made it
            self.cpu.append(value)
            self.moved.append(move)

    def fetch(self) -> None:
        """Start the copy back on the side stream (after the copy out, which ran there too)."""
        if self.back is not None or self.cpu is None:
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            self.back = [v.to(self.device, non_blocking=True) if move else v for v, move in zip(self.cpu, self.moved)]
        self.fetched = stream.record_event()

    def take(self) -> list:
        """The values on the GPU (the input first), ready on the current stream; starts fetching
        the previous layer's."""
        self.fetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.fetched)
        back = self.back
        for value, move in zip(back, self.moved):
            if move:
                value.record_stream(current)  # made on the side stream, used and freed on this one
        self.back = self.cpu = None
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.fetch()
        return back


# The last offloaded input of each device in forward order: the next one links to it.
_last_offloaded: "weakref.WeakValueDictionary[torch.device, _Offloaded]" = weakref.WeakValueDictionary()


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, offload: bool, kind: str, keep: bool):
        ctx.run, ctx.device, ctx.kind = run, hidden.device, kind
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.offloaded = None
        if not offload:
            ctx.saved = hidden.detach()
        elif hidden.is_cuda:
            previous = _last_offloaded.get(hidden.device)
            if previous is not None and previous.cpu is None:  # already taken back: an earlier step's
                previous = None
            ctx.offloaded = _last_offloaded[hidden.device] = _Offloaded(hidden, previous)
            ctx.saved = None
        else:
            ctx.saved = hidden.detach().clone()
        ctx.kept = Kept() if keep else None
        token = _kept.set(ctx.kept)
        try:
            with torch.no_grad():
                out = run(hidden)
        finally:
            _kept.reset(token)
        if ctx.kept is not None:
            ctx.kept.recording = False
            if ctx.offloaded is not None:  # the values travel with the input: the store lets go of them
                values = ctx.kept.values()
                ctx.offloaded.add(values)
                ctx.kept.replace([None] * len(values))
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def backward(ctx, grad):
        if ctx.offloaded is not None:
            hidden, *values = ctx.offloaded.take()
            hidden.requires_grad_(True)
            if ctx.kept is not None:
                ctx.kept.replace(values)
            ctx.offloaded = None
        else:
            hidden = ctx.saved.requires_grad_(True)
            ctx.saved = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):  # dropout draws the same masks again
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            token = _recomputing.set(ctx.kind)
            kept_token = _kept.set(ctx.kept)
            try:
                with torch.enable_grad():
                    out = ctx.run(hidden)
            finally:
                _kept.reset(kept_token)
                _recomputing.reset(token)
        ctx.kept = None
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(out, grad)
        return None, hidden.grad, None, None, None
