from loraforge.config import load_config


def train_config(model_dir, data, out, **overrides):
    base = {
        "model.name": str(model_dir), "train.data": str(data), "train.out": str(out), "train.max_steps": 4,
        "train.micro_batch_size": 2, "train.max_seq_length": 512, "train.lr": 1e-3, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.warmup_ratio": 0.0,
    }
    base.update(overrides)
    return load_config(overrides=base)
