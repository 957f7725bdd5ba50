from torch.utils._python_dispatch import TorchDispatchMode

from loraforge.config import load_config


def train_config(model_dir, data, out, **overrides):
    base = {
        "model.name": str(model_dir), "train.data": str(data), "train.out": str(out), "train.max_steps": 4,
        "train.micro_batch_size": 2, "train.max_seq_length": 512, "train.lr": 1e-3, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.warmup_ratio": 0.0,
    }
    base.update(overrides)
    return load_config(overrides=base)


class KernelCalls(TorchDispatchMode):
    """Counts the calls of the named aten / custom ops that really run (a mode entered later
    that answers a call itself hides it from this one)."""

    def __init__(self, names):
        super().__init__()
        self.names, self.calls = frozenset(names), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func._schema.name in self.names
        return func(*args, **(kwargs or {}))
