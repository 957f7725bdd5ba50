"""What a check says about a sample: nothing (it passes) or a typed ``Reject``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from loraforge.gate.repetition import words_of


class Reason(StrEnum):
    """Stable reason codes: they appear in rejected.jsonl and report.json and never change meaning."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA = "schema"
    EMPTY_RESPONSE = "empty_response"
    TOO_SHORT = "too_short"
    ROLE_ORDER = "role_order"
    SPECIAL_TOKEN = "special_token"
    PII = "pii"
    REPETITION = "repetition"
    TOO_LONG = "too_long"
    NO_SUPERVISED_TOKENS = "no_supervised_tokens"
    EVAL_OVERLAP = "eval_overlap"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"


@dataclass(frozen=True, slots=True)
class Reject:
    code: Reason
    detail: str


@dataclass(slots=True)
class Sample:
    """One record on its way through the gate, normalized to chat ``messages``."""

    messages: list[dict[str, str]]
    source: dict[str, Any]
    # Facts later stages use (num_tokens) or people audit (pii found): written to kept.jsonl.
    meta: dict[str, Any] = field(default_factory=dict)
    # Derived values shared between checks (normalized text, word hashes, words); never written.
    cache: dict[Any, Any] = field(default_factory=dict)

    def words(self, i: int) -> list[str]:
        """``words_of`` message ``i``'s content, computed once: the repetition check and the
        normalized text (ASCII content) both split it so."""
        text = self.messages[i]["content"]
        cached = self.cache.get(("words", i))
        if cached is None or cached[0] is not text:  # not yet, or the content was replaced (redaction)
            cached = self.cache[("words", i)] = (text, words_of(text))
        return cached[1]

    def turns(self, role: str) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == role]
