"""Fused LoRA linear layers: base and low-rank product in one pass, one saved input.

PEFT computes a LoRA layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with x cast to
the adapter's dtype (fp32 by default): per layer a full fp32 copy of x kept for backward, an
fp32 output as wide as the layer's, a scale pass, an add that promotes the result to fp32 and
a cast back. For an 8B Llama's MLP at 8,192 tokens that is several GB of memory traffic per
layer and ~30 GB of extra saved activations per micro-batch.

Here one autograd function does it in the compute dtype: ``h = x A^T`` (tokens x r), then
``y = s h B^T`` with ``x W^T`` added by the base GEMM itself (``addmm_``, below); backward needs
only x (shared by q/k/v and gate/up, kept once) and h. A 4-bit (NF4) base weight is dequantized for
the matmul and again in backward, never stored dequantized (but from a group's recomputation in
a residual block to that block's backward). Gradients of A and B are the
same quantities PEFT's autograd computes, cast to the parameters' dtype (fp32 adapters keep
their fp32 state and updates).

Applied to PEFT's own modules in place (their forward replaced), so saving, loading and
serving see a plain PEFT adapter. Layers it does not cover (dropout > 0, DoRA, biases, more
than one active adapter) keep PEFT's forward.

Order: the low-rank product goes first and the base GEMM adds into it (``y = s h B^T``, then
``y += x W^T`` with beta=1); backward likewise (``grad_x = grad_h A``, then ``+= g W``). The other
order adds the rank-r product after the wide GEMM as a separate pass that reads and writes the
whole output again; in the GEMM's epilogue the read mostly hides behind its math. Measured on an
H200 (8,192 tokens, 8B shapes, ms per call): gate/up forward 1.577 -> 1.481, down's input
gradient 1.772 -> 1.547, q's 0.445 -> 0.412 (docs/BENCHMARKS.md, issue 7, fifth pass).

Projections that read the same input (q/k/v, gate/up: ``group``) run as one function: one
``x [A_q; A_k; A_v]^T`` product instead of three reads of x, one ``grad_A`` product, and the
input gradient accumulated inside the GEMMs (beta=1) instead of autograd's adds of three
separate gradients: q/k/v's backward 0.873 -> 0.648 ms a layer on the same machine. The layer's
code still calls each projection: the first call computes the group's outputs for that input,
the others take theirs (``SharedInput``).

Leaner recomputation: when a checkpointed decoder layer runs again in backward, the value of
its MLP's down projection is not read by anything (it only feeds the residual add that makes
the layer's output, and an add's backward needs no values); only its saved input and ``x A^T``
are. So in that pass the down projection skips its base matmul (and NF4 dequantization): 27%
of a Llama layer's recomputed matmul FLOPs. Where the attention block and the MLP block are
recomputed apart (``memory.offloaded_blocks``), the attention's output projection skips its
base matmul the same way. Only for decoder layers known to be built so
(``memory.RESIDUAL_LAYERS``); Gemma's, with a norm after the MLP, are not among them. Where an
offloaded layer keeps its attention's inputs (``memory.Kept``), the q/k/v group skips its base
matmuls in the recomputation too: its outputs reach the attention only through views and the
rotary embedding, whose backward reads no values (its cos and sin need no gradient), and the
attention takes the kept ones.
Layers that normalize q and k (Qwen3's q_norm / k_norm, whose backward reads them) do not.
"""

from __future__ import annotations

import functools
import types

import torch

from loraforge.train import nf4
from loraforge.train.memory import RESIDUAL_LAYERS, kept, recomputing

# Decoder layers whose attention calls q/k/v, and whose MLP calls gate/up, on one tensor each.
SHARED_INPUT_LAYERS = RESIDUAL_LAYERS


def _quantized(base) -> bool:
    """The base layer's weight is bitsandbytes 4-bit (it carries its quantization state)."""
    return getattr(base.weight, "quant_state", None) is not None


def _dense_weight(base) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor (NF4 dequantized on the fly, by
    ``nf4``'s kernel where ``apply`` found it can, else by bitsandbytes)."""
    if not _quantized(base):
        return base.weight
    if getattr(base, "_loraforge_nf4_off", "not fused") is None:
        return nf4.dequantize_covered(base.weight.data, base.weight.quant_state)
    return nf4.dequantize(base.weight.data, base.weight.quant_state, use_kernel=False)


def _mm_to(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``(scale * m1 @ m2).to(dtype)``, scaled before any cast; on CUDA a bf16/fp16 product
    wanted in fp32 comes out of the GEMM in fp32 (``out_dtype``): no rounding to 16 bits on the way."""
    if dtype == torch.float32 and m1.dtype in (torch.bfloat16, torch.float16) and m1.is_cuda:
        out = torch.mm(m1, m2, out_dtype=dtype)
    else:
        out = m1 @ m2
    if scale != 1:
        out.mul_(scale)
    return out.to(dtype)


def _scaled(B: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * B`` in the compute dtype, scaled in B's own dtype first (one rounding to 16 bits
    for fp32 adapters, as with the scale in the GEMM's alpha); a new tensor when scaled, so the
    parameter is never written."""
    return (B * scale).to(dtype) if scale != 1 else B.to(dtype)


def _low_rank_plus_base(h: torch.Tensor, b: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h b^T + x W^T``: the rank-r product written once, the base GEMM adding into it (beta=1)."""
    y = h @ b.T
    return y.addmm_(x2, weight.to(x2.dtype).T)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scale: float, base, value_unused: bool = False):
        """``value_unused``: the caller reads only the graph (a recomputation whose output feeds
        nothing but an add): the output's values are left unset, its backward is exact."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a, b = A.to(x.dtype), _scaled(B, scale, x.dtype)
        h = x2 @ a.T
        y = x2.new_empty((x2.shape[0], base.out_features)) if value_unused else _low_rank_plus_base(h, b, x2, _dense_weight(base))
        # the compute-dtype copies of A and s B, not the parameters: backward does not cast again
        ctx.save_for_backward(x2, h, a, b)
        ctx.scale, ctx.base, ctx.shape, ctx.dtypes = scale, base, shape, (A.dtype, B.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, h, a, b = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        a_dtype, b_dtype = ctx.dtypes
        grad_h = g @ b  # (tokens, r), b carries the scale
        grad_B = _mm_to(g.T, h, b_dtype, ctx.scale) if ctx.needs_input_grad[2] else None
        grad_A = _mm_to(grad_h.T, x2, a_dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ a).addmm_(g, _dense_weight(ctx.base).to(g.dtype)).view(ctx.shape)
        return grad_x, grad_A, grad_B, None, None, None


class LoraGroupFunction(torch.autograd.Function):
    """Several fused LoRA projections of one input x: ``apply(x, bases, scales, value_unused, A_1, B_1, A_2, B_2, ...)``
    returns one output per base layer, each ``x W_i^T + s_i x A_i^T B_i^T`` (``value_unused``:
    as ``LoraLinearFunction``'s, the values left unset)."""

    @staticmethod
    def forward(ctx, x, bases, scales, value_unused, *adapters):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        As, Bs = adapters[0::2], adapters[1::2]
        a = torch.cat(As).to(x.dtype)  # (sum of ranks, in): one copy and one cast, not one cast per A
        h = x2 @ a.T  # x read once for every projection's A
        ranks = [A.shape[0] for A in As]
        hs = h.split(ranks, dim=1)
        bs = [_scaled(B, s, x.dtype) for B, s in zip(Bs, scales)]
        # NF4 weights dequantized in a block's recomputation: the block's backward follows at
        # once and needs them again; kept until then instead of dequantized a second time (not
        # in a whole layer's, whose backward would hold q/k/v's through the MLP's)
        ctx.dense = [] if recomputing() == "block" and not value_unused and any(_quantized(base) for base in bases) else None
        if value_unused:
            ys = [x2.new_empty((*shape[:-1], base.out_features)) for base in bases]
        else:
            ys = []
            for h_i, b_i, base in zip(hs, bs, bases):
                weight = _dense_weight(base)
                ys.append(_low_rank_plus_base(h_i, b_i, x2, weight).view(*shape[:-1], base.out_features))
                if ctx.dense is not None:
                    ctx.dense.append(weight)
        ctx.save_for_backward(x2, h, a, *bs)
        ctx.bases, ctx.scales, ctx.ranks, ctx.shape = bases, scales, ranks, shape
        ctx.dtypes = [(A.dtype, B.dtype) for A, B in zip(As, Bs)]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        x2, h, a, *bs = ctx.saved_tensors
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        grad_h = torch.cat([g @ b for g, b in zip(gs, bs)], dim=1)  # (tokens, sum of ranks)
        needs = ctx.needs_input_grad[4:]
        grad_adapters = []
        # one product for every A's gradient (x read once), split into each A's rows; each a
        # tensor of its own (a view would make the parameters' .grad share one storage)
        if any(needs[0::2]):
            widest = functools.reduce(torch.promote_types, (a_dtype for a_dtype, _ in ctx.dtypes))
            grad_As = _mm_to(grad_h.T, x2, widest).split(ctx.ranks)
        for i, (g, h_i) in enumerate(zip(gs, h.split(ctx.ranks, dim=1))):
            grad_A = grad_As[i].to(ctx.dtypes[i][0], copy=True) if needs[2 * i] else None
            grad_B = _mm_to(g.T, h_i, ctx.dtypes[i][1], ctx.scales[i]) if needs[2 * i + 1] else None
            grad_adapters += [grad_A, grad_B]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a  # then each base's input gradient added inside its GEMM: no autograd adds
            dense = ctx.dense or map(_dense_weight, ctx.bases)  # one at a time when not kept
            ctx.dense = None
            for g, w in zip(gs, dense):
                grad_x.addmm_(g, w.to(g.dtype))
            grad_x = grad_x.view(ctx.shape)
        return grad_x, None, None, None, *grad_adapters


class SharedInput:
    """Fused LoRA projections that a layer calls one after another on the same tensor (q/k/v,
    gate/up): the first call runs ``LoraGroupFunction`` for all of them, the others take their
    output. A call on another tensor (or a projection called twice) starts the group afresh,
    and every forward of the module that holds them (``parent``) starts with an empty group, so
    an output is only ever taken within the call that computed it. ``feeds_attention``: the
    outputs reach the attention kernel only through views and the rotary embedding (q/k/v of a
    layer without q/k norms), so where the attention is kept (``memory.Kept``) their values go unread."""

    def __init__(self, modules, parent: torch.nn.Module, feeds_attention: bool = False):
        self.modules = list(modules)
        self.feeds_attention = feeds_attention
        self.x = None
        self.pending: dict[int, torch.Tensor] = {}
        parent.register_forward_pre_hook(self.clear)

    def clear(self, *hook_args) -> None:
        self.x, self.pending = None, {}

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.x is not x or id(module) not in self.pending:
            ms = self.modules
            adapters = [t for m in ms for t in (m.lora_A[m._loraforge_adapter].weight, m.lora_B[m._loraforge_adapter].weight)]
            scales = tuple(float(m.scaling[m._loraforge_adapter]) for m in ms)
            store = kept()
            unused = self.feeds_attention and store is not None and store.pending("attention")
            outs = LoraGroupFunction.apply(x, tuple(m.get_base_layer() for m in ms), scales, unused, *adapters)
            self.x, self.pending = x, {id(m): y for m, y in zip(ms, outs)}
        y = self.pending.pop(id(module))
        if not self.pending:  # every output taken: hold no tensor between layers
            self.clear()
        return y


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA forward, fused when only the one planned adapter is active and trainable."""
    name = self._loraforge_adapter
    if kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged or list(self.active_adapters) != [name]:
        return self._loraforge_peft_forward(x, *args, **kwargs)
    if self._loraforge_group is not None:
        return self._loraforge_group.output(self, x)
    unused = recomputing() in self._loraforge_unused_in
    return LoraLinearFunction.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), self.get_base_layer(), unused)


def fusable(module) -> str | None:
    """Why ``module`` keeps PEFT's forward (None: it can be fused)."""
    if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
        return "not a LoRA layer"
    adapters = list(module.lora_A.keys())
    if len(adapters) != 1:
        return "more than one adapter"
    name = adapters[0]
    base = module.get_base_layer()
    if getattr(base, "bias", None) is not None or getattr(module, "lora_bias", {}).get(name):
        return "bias"
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name):
        return "DoRA / LoRA variant"
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "dropout"
    if not isinstance(module.lora_A[name], torch.nn.Linear):
        return "not a linear LoRA"
    if type(base).__name__ not in ("Linear", "Linear4bit"):
        return f"base layer {type(base).__name__}"
    return None


def apply(model, nf4_kernel: bool = True) -> tuple[int, dict[str, int]]:
    """Fuse every LoRA linear layer of ``model`` that can be; returns (fused, {reason: count}).
    ``nf4_kernel``: 4-bit base weights dequantized by ``nf4``'s kernel where it covers them."""
    unused_in = _unused_in_recomputation(model)
    fused, skipped = 0, {}
    for module in model.modules():
        if not hasattr(module, "lora_A") or getattr(module, "_loraforge_adapter", None):
            continue
        why = fusable(module)
        if why is not None:
            if why != "not a LoRA layer":
                skipped[why] = skipped.get(why, 0) + 1
            continue
        module._loraforge_adapter = next(iter(module.lora_A.keys()))
        module._loraforge_unused_in = unused_in.get(id(module), ())
        module._loraforge_group = None
        base = module.get_base_layer()
        if _quantized(base):  # why not the kernel (None: it), decided once: the weights stay where they are
            base._loraforge_nf4_off = nf4.covered(base.weight.data, base.weight.quant_state) if nf4_kernel else "train.nf4_kernel: false"
        module._loraforge_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused, skipped


def group(model) -> int:
    """Join the fused q/k/v and gate/up projections of each known decoder layer into
    ``SharedInput`` groups (run ``apply`` first); returns the number of groups."""
    from loraforge.train.distributed import decoder_layers

    count = 0
    for layer in decoder_layers(model, required=False):
        if type(layer).__name__ not in SHARED_INPUT_LAYERS:
            continue
        for parent, names in ((getattr(layer, "self_attn", None), ("q_proj", "k_proj", "v_proj")), (getattr(layer, "mlp", None), ("gate_proj", "up_proj"))):
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if getattr(m, "_loraforge_adapter", None) is not None and m._loraforge_group is None]
            if len(members) < 2 or len({m.get_base_layer().in_features for m in members}) != 1:
                continue
            feeds_attention = names[0] == "q_proj" and getattr(parent, "q_norm", None) is None and getattr(parent, "k_norm", None) is None
            shared = SharedInput(members, parent, feeds_attention)
            for m in members:
                m._loraforge_group = shared
            count += 1
    return count


def dequantizer(model) -> str:
    """Which code dequantizes the fused layers' 4-bit base weights, and why not the kernel."""
    for module in model.modules():
        base = module.get_base_layer() if getattr(module, "_loraforge_adapter", None) else None
        if base is None or not _quantized(base):
            continue
        return "one Triton kernel (train.nf4)" if base._loraforge_nf4_off is None else f"bitsandbytes ({base._loraforge_nf4_off})"
    return "none (no fused 4-bit layer)"


def _unused_in_recomputation(model) -> dict[int, tuple[str, ...]]:
    """{id of a projection: the recomputations (``memory.recomputing()``) in which nothing reads
    its value}: the down projection, whose output only feeds the add that ends the layer (and
    its MLP block), and the attention's output projection in its block's own recomputation."""
    from loraforge.train.distributed import decoder_layers

    unused = {}
    for layer in decoder_layers(model, required=False):  # none known: nothing is skipped
        if type(layer).__name__ not in RESIDUAL_LAYERS:
            continue
        for parent, name, kinds in (("mlp", "down_proj", ("layer", "block")), ("self_attn", "o_proj", ("block",))):
            module = getattr(getattr(layer, parent, None), name, None)
            if module is not None:
                unused[id(module)] = kinds
    return unused
