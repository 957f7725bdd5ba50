"""Fused LoRA linear layers: base and low-rank product in one pass, one saved input.

PEFT computes a LoRA layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with x cast to
the adapter's dtype (fp32 by default): per layer a full fp32 copy of x kept for backward, an
fp32 output as wide as the layer's, a scale pass, an add that promotes the result to fp32 and
a cast back. For an 8B Llama's MLP at 8,192 tokens that is several GB of memory traffic per
layer and ~30 GB of extra saved activations per micro-batch.

Here one autograd function does it in the compute dtype: ``h = x A^T`` (tokens x r), then
``y = x W^T`` with ``s h B^T`` added by the GEMM itself (``addmm_``); backward needs only x
(shared by q/k/v and gate/up, kept once) and h. A 4-bit (NF4) base weight is dequantized for
the matmul and again in backward, never stored dequantized. Gradients of A and B are the
same quantities PEFT's autograd computes, cast to the parameters' dtype (fp32 adapters keep
their fp32 state and updates).

Applied to PEFT's own modules in place (their forward replaced), so saving, loading and
serving see a plain PEFT adapter. Layers it does not cover (dropout > 0, DoRA, biases, more
than one active adapter) keep PEFT's forward.

Leaner recomputation: when a checkpointed decoder layer runs again in backward, the value of
its MLP's down projection is not read by anything (it only feeds the residual add that makes
the layer's output, and an add's backward needs no values); only its saved input and ``x A^T``
are. So in that pass the down projection skips its base matmul (and NF4 dequantization): 27%
of a Llama layer's recomputed matmul FLOPs. Only for decoder layers known to end that way
(``RESIDUAL_MLP_LAYERS``); Gemma's, with a norm after the MLP, are not among them.
"""

from __future__ import annotations

import types

import torch

from loraforge.train.memory import recomputing

# Decoder layers whose MLP output goes straight into the residual add that ends the layer.
RESIDUAL_MLP_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})


def _dense_weight(base) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor (NF4 dequantized on the fly)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state)


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


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scale: float, base, value_unused: bool = False):
        """``value_unused``: the caller reads only the graph (a recomputation whose output feeds
        nothing but an add): the output's values are left unset, its backward is exact."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a, b = A.to(x.dtype), B.to(x.dtype)
        h = x2 @ a.T
        if value_unused:
            y = x2.new_empty((x2.shape[0], base.out_features))
        else:
            y = x2 @ _dense_weight(base).to(x.dtype).T
            y.addmm_(h, b.T, alpha=scale)
        # the compute-dtype copies of A and B, not the parameters: backward does not cast again
        ctx.save_for_backward(x2, h, a, b)
        ctx.scale, ctx.base, ctx.shape, ctx.dtypes = scale, base, shape, (A.dtype, B.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, h, a, b = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        scale, (a_dtype, b_dtype) = ctx.scale, ctx.dtypes
        # the scale rides in the GEMM (alpha) instead of a pass over its output
        grad_h = torch.addmm(h, g, b, beta=0, alpha=scale)  # (tokens, r); h only gives the shape
        grad_B = _mm_to(g.T, h, b_dtype, scale) if ctx.needs_input_grad[2] else None
        grad_A = _mm_to(grad_h.T, x2, a_dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _dense_weight(ctx.base).to(g.dtype)
            grad_x.addmm_(grad_h, a)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_A, grad_B, None, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA forward, fused when only the one planned adapter is active and trainable."""
    name = self._loraforge_adapter
    if kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged or list(self.active_adapters) != [name]:
        return self._loraforge_peft_forward(x, *args, **kwargs)
    unused = self._loraforge_feeds_residual and recomputing()
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


def apply(model) -> tuple[int, dict[str, int]]:
    """Fuse every LoRA linear layer of ``model`` that can be; returns (fused, {reason: count})."""
    residual_mlp_out = _residual_mlp_outputs(model)
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
        module._loraforge_feeds_residual = id(module) in residual_mlp_out
        module._loraforge_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused, skipped


def _residual_mlp_outputs(model) -> set[int]:
    """ids of the down projections whose output only feeds the layer's closing residual add."""
    from loraforge.train.distributed import decoder_layers

    layers = decoder_layers(model, required=False)  # none known: nothing is skipped
    return {id(layer.mlp.down_proj) for layer in layers if type(layer).__name__ in RESIDUAL_MLP_LAYERS and hasattr(getattr(layer, "mlp", None), "down_proj")}
