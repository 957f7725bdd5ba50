"""Generation metrics: small pure functions of (prediction, reference) strings, and their means.

Two tasks, chosen from the references (``detect_task``):

* ``json`` (structured output, every reference is a JSON object):
  ``json_valid`` (the whole answer parses to a JSON object), ``json_extractable`` (an object
  can be found in the answer: the whole answer, a ```json fence, or an embedded ``{...}``),
  ``field_accuracy`` (mean over the reference's keys of prediction[key] == reference[key];
  0 for an invalid answer), ``exact_match`` (the parsed answer equals the reference).
* ``text``: ``exact_match`` (equal after whitespace normalization) and ``rouge_l``.

JSON values compare as JSON, not as Python: ``"3"`` is not ``3`` and ``true`` is not ``1``,
while ``3`` and ``3.0`` are the same number. ``rouge_l`` is our own ~15 lines (LCS over
lowercased whitespace tokens, F-measure): the ``rouge-score`` package needs nltk and absl-py,
and its default tokenizer (lowercase, non-alphanumerics to spaces) would score ``{"a": 1}``
and ``a 1`` alike, which hides exactly the formatting errors a LoRA adapter is trained away from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

JSON_METRICS = ("json_valid", "json_extractable", "field_accuracy", "exact_match")
TEXT_METRICS = ("exact_match", "rouge_l")
PRIMARY = {"json": "field_accuracy", "text": "rouge_l"}  # what --require-better-than-base compares
LOSS_METRICS = ("loss", "perplexity")


def improved(metric: str, base: float, adapter: float) -> bool:
    """Whether the adapter's value is better than the base's (lower for losses, higher otherwise)."""
    return adapter < base if metric in LOSS_METRICS else adapter > base

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


# ---- JSON ------------------------------------------------------------------------------------


def parse_json_object(text: str) -> dict | None:
    """The answer as a JSON object when the whole answer is one (surrounding whitespace allowed)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def extract_json_object(text: str) -> dict | None:
    """A JSON object anywhere in the answer: whole, inside a ```json fence, or the first ``{...}``."""
    whole = parse_json_object(text)
    if whole is not None:
        return whole
    for fenced in _FENCE.findall(text):
        found = parse_json_object(fenced)
        if found is not None:
            return found
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: booleans are not numbers, strings are not numbers, 3 == 3.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def json_valid(prediction: str, reference: str | None = None) -> float:
    return float(parse_json_object(prediction) is not None)


def json_extractable(prediction: str, reference: str | None = None) -> float:
    return float(extract_json_object(prediction) is not None)


def field_accuracy(prediction: str, reference: str) -> float:
    """Share of the reference's keys whose value the (strictly valid) answer matches; 0 if invalid."""
    expected = parse_json_object(reference)
    if expected is None:
        raise ValueError(f"field_accuracy needs a JSON object as reference, got {reference[:80]!r}")
    predicted = parse_json_object(prediction)
    if predicted is None or not expected:
        return float(predicted is not None and predicted == expected)
    return sum(key in predicted and json_equal(predicted[key], value) for key, value in expected.items()) / len(expected)


def json_exact_match(prediction: str, reference: str) -> float:
    predicted = parse_json_object(prediction)
    return float(predicted is not None and json_equal(predicted, parse_json_object(reference)))


# ---- text ------------------------------------------------------------------------------------


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def text_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_whitespace(prediction) == normalize_whitespace(reference))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1) over lowercased whitespace tokens."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- tasks -----------------------------------------------------------------------------------

Metric = Callable[[str, str], float]

METRICS: dict[str, dict[str, Metric]] = {
    "json": {"json_valid": json_valid, "json_extractable": json_extractable, "field_accuracy": field_accuracy, "exact_match": json_exact_match},
    "text": {"exact_match": text_exact_match, "rouge_l": rouge_l},
}


def detect_task(references: list[str]) -> str:
    """``json`` when every reference is a JSON object, else ``text``."""
    return "json" if references and all(parse_json_object(r) is not None for r in references) else "text"


def metric_names(task: str) -> tuple[str, ...]:
    """Every metric a result of ``task`` carries (generation metrics, then loss and perplexity)."""
    return (*METRICS[task], *LOSS_METRICS)


def per_example(task: str, predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    return [{name: fn(p, r) for name, fn in METRICS[task].items()} for p, r in zip(predictions, references)]


def mean_scores(rows: list[dict[str, float]], task: str) -> dict[str, float]:
    return {name: (sum(row[name] for row in rows) / len(rows) if rows else 0.0) for name in METRICS[task]}
