"""The training loss from the last hidden states: summed token cross-entropy, without logits.

An 8B Llama's logits for 8,192 tokens are 8192 x 128256 values: 2 GiB in bf16, 4 GiB in the
fp32 copy the loss needs, and as much again for their gradient. The fused form never holds
them: it walks the tokens in chunks, computes each chunk's logits, its loss and the gradient
of the hidden states right away (the softmax minus the one-hot label, times the LM head), and
keeps only that gradient (tokens x hidden) for the backward pass.

On CUDA with Liger kernels installed, Liger's Triton kernel does this (the library of the
field); otherwise ``ChunkedLinearCrossEntropy`` below, the same arithmetic in plain PyTorch
(CPU, or a GPU without Liger). Both are checked against the plain logits path in the tests.
"""

from __future__ import annotations

import torch

from loraforge.train.batch import token_loss_sum
from loraforge.train.data import IGNORE

CHUNK_BYTES = 256 * 1024**2  # fp32 logits of one chunk


def chunk_size(vocab: int) -> int:
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    return max(128, 1 << (rows.bit_length() - 1))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T, labels); IGNORE labels carry no loss."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.T).float()
            valid = y != IGNORE
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if need_hidden or need_weight:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(len(y), device=y.device), target] -= 1
                probs *= valid[:, None]
                grad_logits = probs.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk] = grad_logits @ weight
                if need_weight:
                    grad_weight += grad_logits.T.float() @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_total).to(grad_weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None


def fused_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, prefer_liger: bool = True) -> torch.Tensor:
    """Summed CE of next-token prediction: ``hidden`` (N, H) already aligned with ``labels`` (N,)."""
    if prefer_liger and hidden.is_cuda:
        liger = _liger()
        if liger is not None:
            out = liger(hidden, weight, labels, ignore_index=IGNORE, reduction="sum")
            return (out[0] if isinstance(out, tuple) else out).float()
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size(weight.shape[0]))


def plain_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same sum through a full fp32 logits tensor (the reference)."""
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


class CausalLMLoss(torch.nn.Module):
    """The module a training step calls: (tokens, positions, labels) -> summed next-token loss.

    It runs the decoder (LoRA layers included) to its last hidden states and applies the LM head
    inside the loss (fused) or as a plain matmul. Wrapping it (DDP, FSDP) keeps the loss inside
    the wrapped forward, as those wrappers need.
    """

    def __init__(self, model, fused: bool):
        super().__init__()
        self.model = model  # the PEFT model (saved as is)
        self.fused = fused
        # a head that is more than a matmul (a bias, Gemma's logit soft-capping, Cohere's or
        # Granite's logit scale) goes through the model's own forward and its logits
        self.head_is_matmul = head_is_matmul(self.get_base_model())

    def get_base_model(self):
        """The transformers model inside (LoRA layers injected), as PEFT names it."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, **attention_kwargs):
        causal_lm = self.get_base_model()
        if not self.head_is_matmul:
            logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **attention_kwargs).logits
            return token_loss_sum(logits, labels)
        # use_cache=False: the config's default (True) builds a KV cache, copying every layer's K and V
        hidden = causal_lm.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **attention_kwargs
        ).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        weight = causal_lm.lm_head.weight
        if self.fused:
            return fused_loss_sum(hidden, weight, targets)
        return plain_loss_sum(hidden, weight, targets)


def head_is_matmul(causal_lm) -> bool:
    """The model's logits are ``hidden @ lm_head.weight.T`` and nothing else."""
    config = causal_lm.config
    scaled = any(getattr(config, name, None) not in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return not scaled and getattr(causal_lm.lm_head, "bias", None) is None
