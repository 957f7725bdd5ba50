"""Detect each record's format and normalize it to chat ``messages``.

Formats, detected per record (a file may mix them):

=================  =============================================  =========================
format             fields                                         becomes
=================  =============================================  =========================
openai             ``messages``: [{role, content}]                 as is
sharegpt           ``conversations``: [{from, value}]              human->user, gpt->assistant
alpaca             ``instruction``, ``input``?, ``output``          user: instruction + input
prompt/completion  ``prompt``, ``completion``                      user, assistant
=================  =============================================  =========================

An optional top-level ``system`` string becomes the first message. Anything else is a
``schema`` rejection whose detail names the field.
"""

from __future__ import annotations

from typing import Any

from loraforge.gate.verdict import Reason, Reject

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system", "user", "assistant"}
_FORMATS_HELP = "expected one of: messages (openai), conversations (sharegpt), instruction/output (alpaca), prompt/completion"


class SchemaError(ValueError):
    """A record that does not fit its format; the message names the field."""


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):  # OpenAI content parts: only text parts are trainable here
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise SchemaError(f"{where}[{i}]: only text content parts are supported, got {_kind(part)}")
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise SchemaError(f"{where}: expected a string, got {_kind(value)}")
    if not text.isascii():
        try:  # JSON's \ud800 escapes decode to lone surrogates: no character, no tokens, no UTF-8
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SchemaError(f"{where}: holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character {exc.start}), which is no Unicode character") from None
    return text


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return f"object with keys {sorted(value)[:6]}"
    return type(value).__name__


def _turns(value: Any, field: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise SchemaError(f"{field}: expected a list of turns, got {_kind(value)}")
    if not value:
        raise SchemaError(f"{field}: is empty")
    messages = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise SchemaError(f"{where}: expected an object, got {_kind(turn)}")
        if role_key not in turn:
            raise SchemaError(f"{where}.{role_key}: missing")
        role = turn[role_key]
        if not isinstance(role, str) or role.lower() not in roles:
            raise SchemaError(f"{where}.{role_key}: unknown role {role!r} (known: {', '.join(sorted(set(roles)))})")
        if text_key not in turn:
            raise SchemaError(f"{where}.{text_key}: missing")
        messages.append({"role": roles[role.lower()], "content": _text(turn[text_key], f"{where}.{text_key}")})
    return messages


def _present(record: dict[str, Any], key: str) -> bool:
    # Parquet files that mix formats fill absent columns with null.
    return record.get(key) is not None


def to_messages(record: Any) -> list[dict[str, str]]:
    """The record as chat messages; raises ``SchemaError`` naming the offending field."""
    if not isinstance(record, dict):
        raise SchemaError(f"record: expected a JSON object, got {_kind(record)}")
    if _present(record, "messages"):
        messages = _turns(record["messages"], "messages", "role", "content", {r: r for r in _OPENAI_ROLES})
    elif _present(record, "conversations"):
        messages = _turns(record["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
    elif _present(record, "instruction") or (_present(record, "output") and not _present(record, "completion")):
        instruction = _text(record.get("instruction"), "instruction")
        extra = record.get("input")
        extra = "" if extra is None else _text(extra, "input")
        if "output" not in record:
            raise SchemaError("output: missing (alpaca records need instruction and output)")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "output")}]
    elif _present(record, "prompt") or _present(record, "completion"):
        if "completion" not in record:
            raise SchemaError("completion: missing (prompt/completion records need both)")
        messages = [
            {"role": "user", "content": _text(record.get("prompt"), "prompt")},
            {"role": "assistant", "content": _text(record["completion"], "completion")},
        ]
    else:
        raise SchemaError(f"unknown format: keys {sorted(record)[:8]}; {_FORMATS_HELP}")
    if _present(record, "system"):
        if messages[0]["role"] == "system":
            raise SchemaError("system: given both as a field and as the first message")
        messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    for i, message in enumerate(messages):
        if message["role"] != "assistant" and not message["content"].strip():
            raise SchemaError(f"message {i} ({message['role']}): content is empty")
    return messages


def normalize(record: Any) -> list[dict[str, str]] | Reject:
    try:
        return to_messages(record)
    except SchemaError as exc:
        return Reject(Reason.SCHEMA, str(exc))
