"""Sampling on the device: greedy, temperature and top-p for a whole batch, no host sync.

Randomness is a counter-based hash of (request seed, token index), one uniform number per
row, turned into a token by inverse-CDF search over the (top-p truncated) distribution. So a
request's sampled tokens depend only on its seed, prompt and settings, never on which other
requests share its batch (a seeded request is repeatable under any load), and a batch needs
b random numbers instead of b x vocab.
"""

from __future__ import annotations

import torch

from loraforge.serve.engine import GREEDY_BELOW

_M31 = 0x7FFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds); products stay below 2**62 in int64."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _M31
    return x ^ (x >> 15)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One float32 in (0, 1) per row, a function of (seed, counter) only."""
    h = _mix((seed & _M31) ^ _mix((counter * 0x9E3779B1 + 0x632BE5AB) & _M31))
    return (h.to(torch.float64) + 0.5).div(2**31).to(torch.float32)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
           any_sampling: bool, any_top_p: bool) -> torch.Tensor:
    """Next token per row of ``logits`` [b, vocab] (fp32) -> [b] long.

    Rows with temperature below ``GREEDY_BELOW`` take the argmax. ``any_sampling`` /
    ``any_top_p`` (known on the host) skip the softmax and the sort when no row needs them.
    Top-p keeps the most likely tokens whose mass before them is below ``top_p`` (the most
    likely one always), as the HF engine does.
    """
    greedy = logits.argmax(-1)
    if not any_sampling:
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=GREEDY_BELOW)[:, None], dim=-1)
    u = uniform(seed, counter)
    if any_top_p:
        probs, order = probs.sort(dim=-1, descending=True)
        keep = (probs.cumsum(-1) - probs) < top_p[:, None]
        keep[:, 0] = True
        probs = probs * keep
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
    sampled = (order.gather(1, index) if any_top_p else index)[:, 0]
    return torch.where(temperature < GREEDY_BELOW, greedy, sampled)
