"""The gate's per-sample checks: each a small named class with one method.

A check's ``__call__(sample)`` returns ``None`` (pass) or a ``Reject`` with a stable code and a
detail a person can act on. The pipeline owns the loop, the timing and the counters; checks
never know how they are run. Checks that need state across samples (duplicates) live in
``dedup.py`` and run in input order in the main process.
"""

from __future__ import annotations

import re
from typing import ClassVar

from loraforge.config import GateConfig, PiiConfig, RepetitionConfig, TooShortConfig
from loraforge.gate.pii import find_pii, may_contain_pii, redact
from loraforge.models.chat import ChatRenderer
from loraforge.gate.repetition import find_repetition
from loraforge.gate.verdict import Reason, Reject, Sample

# Structural markers of the chat-template families in use: any of them inside content either
# confuses the template or teaches the model to emit a turn boundary mid-answer.
FOREIGN_MARKERS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|python_tag|>",  # Llama 3
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",  # ChatML (Qwen, SmolLM, OpenAI)
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",  # Llama 2, Mistral
    "<start_of_turn>", "<end_of_turn>",  # Gemma
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # Phi-3, Zephyr
)


def _excerpt(text: str, start: int, end: int, context: int = 30) -> str:
    left = max(0, start - context)
    return ("..." if left else "") + text[left : end + context].replace("\n", "\\n") + ("..." if end + context < len(text) else "")


class Check:
    """One rule. Subclasses set ``code`` and implement ``__call__``."""

    code: ClassVar[Reason]

    def __call__(self, sample: Sample) -> Reject | None:  # pragma: no cover - interface
        raise NotImplementedError

    def reject(self, detail: str) -> Reject:
        return Reject(self.code, detail)


class EmptyResponseCheck(Check):
    code = Reason.EMPTY_RESPONSE

    def __call__(self, sample: Sample) -> Reject | None:
        for i, message in enumerate(sample.messages):
            if message["role"] == "assistant" and not message["content"].strip():
                return self.reject(f"message {i} (assistant) is empty")
        return None


class TooShortCheck(Check):
    code = Reason.TOO_SHORT
    _ALNUM = re.compile(r"[^\W_]")  # a letter or digit in any script

    def __init__(self, cfg: TooShortConfig):
        self.cfg = cfg

    def __call__(self, sample: Sample) -> Reject | None:
        for i, message in enumerate(sample.messages):
            if message["role"] != "assistant":
                continue
            text = message["content"].strip()
            if not self._ALNUM.search(text):
                return self.reject(f"message {i} (assistant) has no letter or digit: {text[:40]!r}")
            if self.cfg.min_chars is not None and len(text) < self.cfg.min_chars:
                return self.reject(f"message {i} (assistant) has {len(text)} characters (minimum {self.cfg.min_chars})")
            if self.cfg.min_words is not None and len(text.split()) < self.cfg.min_words:
                return self.reject(f"message {i} (assistant) has {len(text.split())} words (minimum {self.cfg.min_words})")
        return None


class RoleOrderCheck(Check):
    """System only first; then user and assistant alternate, starting with user, ending with assistant."""

    code = Reason.ROLE_ORDER

    def __call__(self, sample: Sample) -> Reject | None:
        roles = [m["role"] for m in sample.messages]
        first = 1 if roles[0] == "system" else 0
        for i, role in enumerate(roles[first:], start=first):
            expected = "user" if (i - first) % 2 == 0 else "assistant"
            if role != expected:
                after = f" after '{roles[i - 1]}'" if i else ""
                return self.reject(f"message {i}: expected '{expected}'{after}, got '{role}' (roles: {' '.join(roles)})")
        if roles[-1] != "assistant":
            return self.reject(f"the conversation ends with '{roles[-1]}', not with an assistant answer to learn from")
        return None


class SpecialTokenCheck(Check):
    """Special tokens of the target tokenizer and other templates' markers inside content."""

    code = Reason.SPECIAL_TOKEN

    def __init__(self, tokenizer_tokens: list[str], extra: list[str]):
        markers = sorted({t for t in (*tokenizer_tokens, *FOREIGN_MARKERS, *extra) if t and t.strip()}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, markers)))
        # A cheap prefilter: the first characters any marker can start with.
        self.first_chars = frozenset(m[0] for m in markers)

    def __call__(self, sample: Sample) -> Reject | None:
        for i, message in enumerate(sample.messages):
            text = message["content"]
            if not any(c in text for c in self.first_chars):  # a few substring searches in C
                continue
            match = self.pattern.search(text)
            if match:
                return self.reject(
                    f"message {i} ({message['role']}) contains {match.group(0)!r}: "
                    f"{_excerpt(text, match.start(), match.end())}"
                )
        return None


class PiiCheck(Check):
    """Drop, redact or flag emails, phone numbers, IP addresses and API keys."""

    code = Reason.PII

    def __init__(self, cfg: PiiConfig):
        self.cfg = cfg

    def __call__(self, sample: Sample) -> Reject | None:
        if not may_contain_pii("\n".join([m["content"] for m in sample.messages]), self.cfg.kinds):
            return None  # one prefilter pass over all messages: a finding in one is in the joined text
        found = [(i, kind, text) for i, m in enumerate(sample.messages) for kind, text in find_pii(m["content"], self.cfg.kinds)]
        if not found:
            return None
        if self.cfg.mode == "drop":
            i, kind, text = found[0]
            return self.reject(f"message {i} contains {kind} {text!r}" + (f" (+{len(found) - 1} more)" if len(found) > 1 else ""))
        sample.meta["pii"] = sorted({kind for _, kind, _ in found})
        if self.cfg.mode == "redact":
            for message in sample.messages:
                message["content"] = redact(message["content"], self.cfg.kinds)
        return None


class RepetitionCheck(Check):
    code = Reason.REPETITION

    def __init__(self, cfg: RepetitionConfig):
        self.cfg = cfg

    def __call__(self, sample: Sample) -> Reject | None:
        for i, message in enumerate(sample.messages):
            if message["role"] == "assistant":
                why = find_repetition(message["content"], self.cfg, sample.words(i))
                if why:
                    return self.reject(f"message {i} (assistant): {why}")
        return None


class LengthCheck(Check):
    """Token count with the model's own chat template, against ``max_seq_length``.

    Records ``num_tokens`` for the trainer. ``no_supervised_tokens`` when even the first
    assistant answer would start past the limit, ``too_long`` otherwise.
    """

    code = Reason.TOO_LONG

    def __init__(self, tokenizer, max_seq_length: int):
        self.renderer = ChatRenderer(tokenizer)
        self.max_seq_length = max_seq_length

    def count(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> int:
        return self.renderer.count_tokens(self.renderer.render(messages, add_generation_prompt))

    def __call__(self, sample: Sample) -> Reject | None:
        n = sample.meta["num_tokens"] = self.count(sample.messages)
        if n <= self.max_seq_length:
            return None
        first_answer = next(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
        prompt = self.count(sample.messages[:first_answer], add_generation_prompt=True)
        if prompt >= self.max_seq_length:
            return Reject(
                Reason.NO_SUPERVISED_TOKENS,
                f"the prompt before the first answer is {prompt} tokens; with max_seq_length {self.max_seq_length} "
                "no answer token would remain to learn from",
            )
        return self.reject(f"{n} tokens with the chat template, over max_seq_length {self.max_seq_length}")


def build_checks(cfg: GateConfig, tokenizer, eval_overlap=None) -> list[Check]:
    """The enabled per-sample checks, in the order they run (cheapest and most basic first)."""
    c = cfg.checks
    checks: list[Check] = []
    if c.empty_response:
        checks.append(EmptyResponseCheck())
    if c.too_short.enabled:
        checks.append(TooShortCheck(c.too_short))
    if c.role_order:
        checks.append(RoleOrderCheck())
    if c.special_token.enabled:
        checks.append(SpecialTokenCheck(_tokenizer_specials(tokenizer), c.special_token.extra_markers))
    if c.pii.mode != "off":
        checks.append(PiiCheck(c.pii))
    if c.repetition.enabled:
        checks.append(RepetitionCheck(c.repetition))
    if eval_overlap is not None:
        checks.append(eval_overlap)
    if c.length.enabled and tokenizer is not None:
        checks.append(LengthCheck(tokenizer, cfg.max_seq_length))
    return checks


def _tokenizer_specials(tokenizer) -> list[str]:
    if tokenizer is None:
        return []
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return [*tokenizer.all_special_tokens, *added]
