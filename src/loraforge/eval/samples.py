"""Held-out test data -> ``EvalSample``s: every format the gate reads, strictly.

The gate's readers and normalizer do the work (JSONL / JSON array / Parquet, gzipped or not;
OpenAI ``messages``, ShareGPT, alpaca, prompt/completion). Unlike the gate, which rejects a bad
record and goes on, evaluation stops at the first one: a test set with a broken line is a
test set nobody meant, and the message names the file and line to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import EvalError
from loraforge.gate.normalize import SchemaError, to_messages
from loraforge.gate.readers import check_inputs, read_records


@dataclass(frozen=True)
class EvalSample:
    messages: list[dict[str, str]]  # the whole conversation; its last turn is the assistant's answer
    line: int  # 1-based line (JSON, JSONL) or 0-based row (Parquet)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_text(self) -> str:
        """The last non-assistant turn: what a person reads as "the question" in the examples table."""
        return next((m["content"] for m in reversed(self.prompt_messages) if m["role"] != "assistant"), "")


def read_samples(path: Path) -> list[EvalSample]:
    path = Path(path)
    check_inputs([path])  # missing file, directory, unsupported extension: InputError naming it
    samples = []
    for record in read_records(path, 0):
        where = f"{path}:{record.line}"
        value = record.value
        if record.text is not None:
            try:
                value = json.loads(record.text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise EvalError(f"{where}: not valid JSON ({exc}); fix or remove the line") from exc
        try:
            messages = to_messages(value)
        except SchemaError as exc:
            raise EvalError(f"{where}: not a chat sample: {exc}") from exc
        if messages[-1]["role"] != "assistant":
            raise EvalError(f"{where}: no final assistant turn (the reference answer): the last message is {messages[-1]['role']!r}")
        if len(messages) < 2:
            raise EvalError(f"{where}: only an assistant turn: nothing to prompt the model with")
        samples.append(EvalSample(messages, record.line))
    if not samples:
        raise EvalError(f"{path}: no samples")
    return samples
