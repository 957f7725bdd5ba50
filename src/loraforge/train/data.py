"""From chat messages to training rows: tokens, a label mask on assistant tokens only, packing.

The conversation is rendered once with the model's own chat template (the one stored with the
adapter and used by serving) and tokenized once; character offsets then mark which tokens
belong to assistant answers (their content and the template's end-of-turn marker). Tokenizing
prefixes separately could merge differently at the boundary; offsets cannot.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import TemplateError, TrainError
from loraforge.models.chat import ChatRenderer

IGNORE = -100  # label of tokens that carry no loss (prompt, system, padding)


@dataclass(slots=True)
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    source: dict = field(default_factory=dict)

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class ChatTokenizer:
    """messages -> (input_ids, labels) with the model's own chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer)
        self.backend = tokenizer.backend_tokenizer

    def assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.renderer.render(messages[:i], add_generation_prompt=True)
            upto = self.renderer.render(messages[: i + 1])
            if not text.startswith(prefix) or not text.startswith(upto) or not upto.startswith(prefix):
                raise TemplateError(
                    "the chat template renders earlier turns differently once later turns exist, so "
                    "assistant tokens cannot be located; train on single-turn samples or use a "
                    "template whose rendering of a conversation extends its rendering of each prefix"
                )
            spans.append((len(prefix), len(upto)))
        return spans

    def __call__(self, messages: list[dict[str, str]], source: dict | None = None) -> TokenizedSample:
        text = self.renderer.render(messages)
        spans = self.assistant_spans(messages, text)
        encoding = self.backend.encode(text, add_special_tokens=False)
        labels = []
        for token, (start, _) in zip(encoding.ids, encoding.offsets):
            inside = any(lo <= start < hi for lo, hi in spans)
            labels.append(token if inside else IGNORE)
        return TokenizedSample(list(encoding.ids), labels, source or {})


def read_messages(path: Path) -> list[tuple[list[dict[str, str]], dict]]:
    """(messages, source) of every line of a gate output file (kept.jsonl)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((record["messages"], record.get("source") or {"file": str(path), "line": number}))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TrainError(f"{path}:{number}: not a gate output line ({exc}); run `loraforge gate` on it first") from exc
    return rows


def split_eval(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split (at least one eval sample when fraction > 0 and rows > 1)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def truncate(sample: TokenizedSample, max_len: int) -> TokenizedSample | None:
    """Cut to max_len tokens; None when no supervised token would remain."""
    if len(sample.input_ids) > max_len:
        sample = TokenizedSample(sample.input_ids[:max_len], sample.labels[:max_len], sample.source)
    return sample if sample.supervised > 0 else None


# ---- packing -----------------------------------------------------------------------------


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group sample indices into rows of at most ``max_len`` tokens (first-fit decreasing).

    Deterministic for the same lengths. Every index appears exactly once; a row never exceeds
    ``max_len`` (samples are truncated to ``max_len`` before packing).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, over max_len {max_len}: truncate first")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def packing_efficiency(rows: list[list[int]], lengths: list[int], max_len: int) -> float:
    """Real tokens over the tokens of full-length rows."""
    return sum(lengths) / (len(rows) * max_len) if rows else 0.0
