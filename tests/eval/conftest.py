"""A tiny trained run and clean held-out data, shared by the end-to-end evaluation tests."""

import json
import random
import sys

import pytest


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, demo_kept):
    """A tiny adapter after 3 steps at a high learning rate: enough to move its loss off the base's."""
    from loraforge.config import load_config
    from loraforge.train.recipe import train

    out = tmp_path_factory.mktemp("eval-run") / "run"
    config = load_config(overrides={
        "model.name": str(tiny_model_dir), "train.data": str(demo_kept), "train.out": str(out), "train.max_steps": 3,
        "train.micro_batch_size": 4, "train.max_seq_length": 256, "train.lr": 1e-2, "train.eval_every": 100,
        "train.checkpoint_every": 100, "train.warmup_ratio": 0.0,
    })
    return train(config, show_progress=False).run_dir


def order_samples(n: int, seed: int = 1) -> list[dict]:
    from loraforge.demo.data import order_sample

    rng = random.Random(seed)
    return [order_sample(rng) for _ in range(n)]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="session")
def orders_test_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-data") / "test.jsonl"
    write_jsonl(path, order_samples(6))
    return path


def run_cli(monkeypatch, *args) -> int:
    """``loraforge ARGS`` in-process through ``main()`` (its error -> exit code mapping included)."""
    from loraforge.cli import main

    monkeypatch.setattr(sys, "argv", ["loraforge", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code or 0
