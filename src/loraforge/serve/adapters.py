"""Adapters on disk: where they may come from, what they must contain, which template they use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import AdapterError

log = logging.getLogger("loraforge.serve")


@dataclass
class AdapterInfo:
    name: str
    path: Path
    tokenizer: object  # the adapter's own tokenizer and chat template (the one it was trained with)
    template_matches_base: bool


def adapter_path(source: Path | str) -> Path:
    """A run directory or an adapter directory -> the directory with adapter_config.json."""
    path = Path(source)
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / "adapter_model.safetensors").is_file():
                raise AdapterError(f"{candidate}: no adapter_model.safetensors; loraforge loads safetensors only, never pickles (.bin)")
            return candidate
    raise AdapterError(f"{path}: no adapter here (adapter_config.json); pass a run directory or its adapter/ folder")


def confined(root: Path, requested: str) -> Path:
    """``requested`` resolved under ``root``; refuses absolute paths, '..' and symlinks that escape."""
    root = root.resolve()
    if Path(requested).is_absolute():
        raise AdapterError("adapter path must be relative to the adapter root")
    target = (root / requested).resolve()  # follows symlinks: an escaping link resolves outside root
    if target != root and root not in target.parents:
        raise AdapterError("adapter path escapes the adapter root")
    return target


def load_adapter_info(name: str, source: Path | str, base_tokenizer) -> AdapterInfo:
    from transformers import AutoTokenizer

    path = adapter_path(source)
    tokenizer = base_tokenizer
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    matches = tokenizer.chat_template == base_tokenizer.chat_template
    if not matches:
        log.warning("adapter %s: its chat template differs from the base model's; its requests use its own", name)
    if tokenizer.chat_template is None:
        tokenizer = base_tokenizer
    return AdapterInfo(name, path, tokenizer, matches)
