"""The metric names and label matchers a PromQL expression reads, without a PromQL parser.

A small lexer (strings, label matchers, durations and numbers are tokens of their own) and
three rules: an identifier followed by ``(`` is a function or aggregation; the label lists of
``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` are skipped; keywords are
not metrics. Every other identifier outside ``{...}`` and ``[...]`` is a metric name, with the
label names of the matcher that follows it. Grafana's ``$variables`` are removed first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "inf", "nan",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio", "start", "end", "atan2",
}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>\.?\d[\w.]*(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matchop>=~|!~|!=|==|=)
  | (?P<punct>[{}\[\]()@,])
  | (?P<other>.)
""", re.VERBOSE)
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")


@dataclass
class Selector:
    name: str
    labels: set[str] = field(default_factory=set)  # label names in its {...} matcher
    equals: dict[str, str] = field(default_factory=dict)  # label="value" matchers


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    for m in _TOKEN.finditer(_GRAFANA_VARIABLE.sub("", expr)):
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


def _matcher(tokens, i) -> tuple[Selector, int]:
    """The matcher opening at tokens[i] ('{') as a Selector (name from __name__="x" or empty); the index after '}'."""
    selector = Selector("")
    i += 1
    while i < len(tokens) and tokens[i][1] != "}":
        kind, text = tokens[i]
        if kind == "ident" and i + 1 < len(tokens) and tokens[i + 1][0] == "matchop":
            value = tokens[i + 2][1][1:-1] if i + 2 < len(tokens) and tokens[i + 2][0] == "string" else None
            if tokens[i + 1][1] == "=" and value is not None:
                selector.equals[text] = value
            if text == "__name__":
                selector.name = value if tokens[i + 1][1] == "=" and value else ""
            else:
                selector.labels.add(text)
        i += 1
    selector.equals.pop("__name__", None)
    return selector, i + 1


def _skip_to(tokens, i, closing: str) -> int:
    while i < len(tokens) and tokens[i][1] != closing:
        i += 1
    return i + 1


def selectors(expr: str) -> list[Selector]:
    tokens = _tokens(expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":
            i = _skip_to(tokens, i, "]")  # range or subquery: durations only
        elif text == "{":  # a matcher without a metric name in front: {__name__="x", ...}
            selector, i = _matcher(tokens, i)
            if selector.name:
                found.append(selector)
        elif kind == "ident" and text.lower() in LABEL_LISTS and nxt == "(":
            i = _skip_to(tokens, i + 1, ")")
        elif kind == "ident" and (nxt == "(" or text.lower() in KEYWORDS):
            i += 1  # a function, an aggregation or a keyword
        elif kind == "ident":
            selector, i = _matcher(tokens, i + 1) if nxt == "{" else (Selector(""), i + 1)
            selector.name = text
            found.append(selector)
        else:
            i += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr)}


SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_info")


def family(name: str) -> str:
    """The metric family a sample name belongs to: llm_requests_total -> llm_requests."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name
