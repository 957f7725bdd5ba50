import pytest

from loraforge.config import load_config


@pytest.fixture(scope="session")
def demo_kept(tmp_path_factory, tiny_tokenizer):
    """Gate output of 80 generated demo samples (the tiny model's tokenizer counts tokens)."""
    from loraforge.demo.data import write_demo_data
    from loraforge.gate import run_gate

    tmp = tmp_path_factory.mktemp("demo")
    write_demo_data(tmp / "data.jsonl", n=80)
    run_gate([tmp / "data.jsonl"], tmp / "gated", load_config(overrides={"gate.workers": 1}), tokenizer=tiny_tokenizer)
    return tmp / "gated" / "kept.jsonl"


def train_config(model_dir, data, out, **overrides):
    base = {
        "model.name": str(model_dir), "train.data": str(data), "train.out": str(out), "train.max_steps": 4,
        "train.micro_batch_size": 2, "train.max_seq_length": 512, "train.lr": 1e-3, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.warmup_ratio": 0.0,
    }
    base.update(overrides)
    return load_config(overrides=base)
