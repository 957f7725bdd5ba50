"""Personal data and secrets in message content: emails, phone numbers, IP addresses, API keys."""

from __future__ import annotations

import ipaddress
import re

try:  # the prefilters in one pass in C (setup.py builds it); without it, the ones below
    from loraforge.gate import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

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
    # every phone match ends in 3 digits, a separator and 4 digits, or starts with + and a digit
    "phone": re.compile(r"\d{3}[ .-]\d{4}|\+\d"),
    # a dotted quad holds "d.d{1,3}.d"; eight hex groups hold "h:h{1,4}:h"
    "ip": re.compile(r"\d\.\d{1,3}\.\d|[0-9a-fA-F]:[0-9a-fA-F]{1,4}:[0-9a-fA-F]"),
    "api_key": re.compile(r"sk-|AKIA|gh[pousr]_|xox|AIza|hf_"),
}


# For ASCII text the prefilters are substring searches in C over a copy whose digits are all
# "0" (and, for IPv6, whose hex digits are all "h"): the same conditions, without a regex scan.
_DIGITS = bytes(ord("0") if chr(c).isdigit() else c for c in range(128)) + bytes(range(128, 256))
_HEX = bytes(ord("h") if chr(c) in "0123456789abcdefABCDEF" else c for c in range(128)) + bytes(range(128, 256))
_PHONE_NEEDLES = (b"+0", b"000 0000", b"000.0000", b"000-0000")
_IP4_NEEDLES = (b"0.0.0", b"0.00.0", b"0.000.0")
_IP6_NEEDLES = (b"h:h:h", b"h:hh:h", b"h:hhh:h", b"h:hhhh:h")
_KEY_NEEDLES = ("sk-", "AKIA", "xox", "AIza", "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")


def _ip_ascii(text: str, digits: bytes) -> bool:
    if any(n in digits for n in _IP4_NEEDLES):
        return True
    return ":" in text and any(n in text.encode("ascii").translate(_HEX) for n in _IP6_NEEDLES)


_ASCII_PREFILTERS = {
    "email": lambda text, digits: "@" in text,
    "phone": lambda text, digits: any(n in digits for n in _PHONE_NEEDLES),
    "ip": _ip_ascii,
    "api_key": lambda text, digits: any(n in text for n in _KEY_NEEDLES),
}


def _may_contain(kind: str, text: str, digits: bytes | None) -> bool:
    """False proves ``PATTERNS[kind]`` does not match ``text``."""
    if digits is not None:
        return _ASCII_PREFILTERS[kind](text, digits)
    return _PREFILTERS[kind].search(text) is not None


_KIND_BITS = {"email": 1, "phone": 2, "ip": 4, "api_key": 8}  # _native.pii_prefilter's answer


def _possible(text: str, kinds: list[str]) -> list[str]:
    """Those of ``kinds`` whose prefilter passes: for the others, ``PATTERNS[kind]`` does not match."""
    if _native is not None:
        mask = _native.pii_prefilter(text)
        return [kind for kind in kinds if mask & _KIND_BITS[kind]]
    digits = text.encode("ascii").translate(_DIGITS) if text.isascii() else None
    return [kind for kind in kinds if _may_contain(kind, text, digits)]


def may_contain_pii(text: str, kinds: list[str]) -> bool:
    """False proves that ``find_pii(text, kinds)`` finds nothing (the prefilters only search for substrings
    and patterns without look-around, so they also hold for any text that contains ``text``)."""
    return bool(_possible(text, kinds))


def find_pii(text: str, kinds: list[str]) -> list[tuple[str, str]]:
    """(kind, matched text) for every finding in ``text``."""
    found = []
    for kind in _possible(text, kinds):
        for match in PATTERNS[kind].finditer(text):
            if _valid(kind, match.group(0)):
                found.append((kind, match.group(0)))
    return found


def redact(text: str, kinds: list[str]) -> str:
    for kind in kinds:
        text = PATTERNS[kind].sub(lambda m, k=kind: f"[{k.upper()}]" if _valid(k, m.group(0)) else m.group(0), text)
    return text
