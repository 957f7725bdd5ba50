"""Personal data and secrets in message content: emails, phone numbers, IP addresses, API keys."""

from __future__ import annotations

import ipaddress
import re

PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    # +country code or (area) forms, or 3-3-4 digit groups; dates and plain numbers do not match
    "phone": re.compile(
        r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w.])"
        r"|(?<![\w.])\+\d{1,3}(?:[ .-]?\d{2,4}){3,4}(?![\w.])"
    ),
    "ip": re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?![\w:])"),
    "api_key": re.compile(
        r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}"  # OpenAI-style
        r"|AKIA[0-9A-Z]{16}"  # AWS access key id
        r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub tokens
        r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
        r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
        r"|hf_[A-Za-z0-9]{30,})"  # Hugging Face
    ),
}


def _valid(kind: str, text: str) -> bool:
    if kind == "ip":
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return False
    return True


# Cheap necessary conditions, tested first: most text has no '@', no long digit run, no key prefix.
_PREFILTERS: dict[str, re.Pattern] = {
    "email": re.compile(r"@"),
    "phone": re.compile(r"\d{4}"),
    "ip": re.compile(r"\d\.\d|[0-9a-fA-F]:[0-9a-fA-F]"),
    "api_key": re.compile(r"sk-|AKIA|gh[pousr]_|xox|AIza|hf_"),
}


def find_pii(text: str, kinds: list[str]) -> list[tuple[str, str]]:
    """(kind, matched text) for every finding in ``text``."""
    found = []
    for kind in kinds:
        if not _PREFILTERS[kind].search(text):
            continue
        for match in PATTERNS[kind].finditer(text):
            if _valid(kind, match.group(0)):
                found.append((kind, match.group(0)))
    return found


def redact(text: str, kinds: list[str]) -> str:
    for kind in kinds:
        text = PATTERNS[kind].sub(lambda m, k=kind: f"[{k.upper()}]" if _valid(k, m.group(0)) else m.group(0), text)
    return text
