"""Rows of packed samples -> model inputs: tokens, labels, restarting positions, a block mask.

The 4D boolean mask is block-diagonal causal: a token attends only to earlier tokens of its
own sample, so packed samples never see each other (PyTorch SDPA takes it as is; flash
attention kernels that read boundaries from restarting ``position_ids`` get those too).
Padding tokens attend only to themselves, so no attention row is empty (an empty row is NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.train.data import IGNORE, TokenizedSample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), IGNORE where no loss
    position_ids: torch.Tensor  # (B, L), restarting at 0 for each sample
    attention_mask: torch.Tensor  # (B, 1, L, L) bool
    real_tokens: int

    @property
    def supervised(self) -> int:
        """Tokens that carry loss after the causal shift (a label at position t is predicted at t-1)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
            self.attention_mask.to(device), self.real_tokens,
        )


def collate(rows: list[list[TokenizedSample]], pad_id: int) -> Batch:
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    real = 0
    for b, row in enumerate(rows):
        at = 0
        for k, sample in enumerate(row):
            size = len(sample.input_ids)
            input_ids[b, at : at + size] = torch.tensor(sample.input_ids)
            sample_labels = torch.tensor(sample.labels)
            sample_labels[0] = IGNORE  # never predict a sample's first token from the previous sample
            labels[b, at : at + size] = sample_labels
            position_ids[b, at : at + size] = torch.arange(size)
            segment[b, at : at + size] = k
            at += size
        real += at
        # padding: each its own segment, attending only to itself
        segment[b, at:] = torch.arange(len(row), len(row) + width - at)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    return Batch(input_ids, labels, position_ids, mask[:, None], real)


def padding_batch(pad_id: int) -> Batch:
    """Two padding tokens and no label: the pass a rank with no rows left runs, loss exactly 0,
    so that every rank runs the same number of forward/backward passes."""
    mask = torch.tril(torch.ones(2, 2, dtype=torch.bool))[None, None]
    return Batch(torch.full((1, 2), pad_id), torch.full((1, 2), IGNORE), torch.arange(2)[None], mask, 0)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over supervised tokens (the caller divides by the step's total)."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE, reduction="sum")
