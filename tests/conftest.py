"""Shared fixtures: tiny models with real tokenizers, the shared real data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LORAFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from loraforge.models import build_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from loraforge.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from loraforge.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared real data not available ({path})")
    return path


@pytest.fixture
def alpaca_file() -> Path:
    return shared_file("alpaca_cleaned_1000.json")


@pytest.fixture
def sharegpt_file() -> Path:
    return shared_file("sharegpt_conversations_500.json")


@pytest.fixture(scope="session")
def demo_kept(tmp_path_factory, tiny_tokenizer):
    """Gate output of 80 generated demo samples (the tiny model's tokenizer counts tokens)."""
    from loraforge.config import load_config
    from loraforge.demo.data import write_demo_data
    from loraforge.gate import run_gate

    tmp = tmp_path_factory.mktemp("demo")
    write_demo_data(tmp / "data.jsonl", n=80)
    run_gate([tmp / "data.jsonl"], tmp / "gated", load_config(overrides={"gate.workers": 1}), tokenizer=tiny_tokenizer)
    return tmp / "gated" / "kept.jsonl"
