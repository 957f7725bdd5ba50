"""Rows of packed samples -> model inputs: tokens, labels, restarting positions, sample bounds.

Two layouts of the same samples, the same loss:

* ``collate`` (padded rows, SDPA): one row per packed row, padded to the longest, with a 4D
  block mask (below). Any attention kernel, any device.
* ``collate_flat`` (padding-free, varlen attention): every sample of the micro-batch in one
  flat row, no padding, no mask; ``cu_seqlens`` marks the samples for the varlen kernel
  (``train.attention``).

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
    attention_mask: torch.Tensor | None  # (B, 1, L, L) bool; None in the flat layout
    real_tokens: int
    cu_seqlens: torch.Tensor | None = None  # flat layout: (samples + 1,) int32 sample bounds
    max_len: int = 0  # flat layout: the longest sample

    def model_kwargs(self) -> dict:
        """Keyword arguments of the model's forward (besides tokens and labels)."""
        if self.cu_seqlens is None:
            return {"attention_mask": self.attention_mask, "position_ids": self.position_ids}
        from loraforge.train.attention import flat_kwargs

        return {"position_ids": self.position_ids} | flat_kwargs(self.cu_seqlens, self.max_len)

    @property
    def supervised(self) -> int:
        """Tokens that carry loss after the causal shift (a label at position t is predicted at t-1)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        device = torch.device(device)
        # to the GPU pinned and non-blocking: a plain copy first waits for all its queued work
        # (the previous step), which leaves it idle while this step is launched
        cuda = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)

        return Batch(
            move(self.input_ids), move(self.labels), move(self.position_ids),
            None if self.attention_mask is None else move(self.attention_mask), self.real_tokens,
            None if self.cu_seqlens is None else move(self.cu_seqlens), self.max_len,
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


def collate_flat(rows: list[list[TokenizedSample]]) -> Batch:
    """Every sample of these rows, in order, in one row of shape (1, total tokens)."""
    samples = [s for row in rows for s in row]
    lengths = [len(s.input_ids) for s in samples]
    input_ids = torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.long)[None]
    labels = torch.tensor([t for s in samples for t in s.labels], dtype=torch.long)[None]
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts] = IGNORE  # never predict a sample's first token from the previous sample
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Batch(input_ids, labels, position_ids, None, sum(lengths), cu_seqlens, max(lengths))


def padding_batch(pad_id: int, flat: bool = False) -> Batch:
    """Two padding tokens and no label: the pass a rank with no rows left runs, loss exactly 0,
    so that every rank runs the same number of forward/backward passes."""
    if flat:
        return Batch(torch.full((1, 2), pad_id), torch.full((1, 2), IGNORE), torch.arange(2)[None], None, 0, torch.tensor([0, 2], dtype=torch.int32), 2)
    mask = torch.tril(torch.ones(2, 2, dtype=torch.bool))[None, None]
    return Batch(torch.full((1, 2), pad_id), torch.full((1, 2), IGNORE), torch.arange(2)[None], mask, 0)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over supervised tokens (the caller divides by the step's total)."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE, reduction="sum")
