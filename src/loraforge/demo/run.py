"""``loraforge demo``: the pipeline end to end on generated data with the embedded default.

Stages that exist run in order; each later stage adds its step here.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from loraforge.config import load_config
from loraforge.demo.data import write_demo_data
from loraforge.gate import run_gate
from loraforge.gate.report import render_table

# Small enough for 2 CPU cores in about two minutes (a 135M model trains at ~100 tokens/s
# there), large enough for the loss to fall clearly: 16 steps of 4 rows of <= 256 tokens.
DEMO_TRAIN = {
    "train.max_seq_length": 256,
    "train.micro_batch_size": 4,
    "train.max_steps": 16,
    "train.lr": 1e-3,
    "train.eval_every": 8,
    "train.checkpoint_every": 8,
}


def run_demo(out: Path, model: str, console: Console) -> None:
    out = Path(out)
    data = out / "data.jsonl"
    counts = write_demo_data(data)
    console.rule("1. demo data")
    console.print(f"{data}: {counts['good']} good order-extraction samples and {counts['planted']} planted bad ones")

    console.rule("2. gate")
    config = load_config(overrides={"model.name": model, "train.data": str(out / "gated" / "kept.jsonl"), "train.out": str(out / "run"), **DEMO_TRAIN})
    report = run_gate([data], out / "gated", config, show_progress=True)
    console.print(render_table(report))
    console.print(f"kept -> {report.outputs['kept']}\nrejected (with reasons) -> {report.outputs['rejected']}")

    console.rule("3. train")
    import shutil

    from loraforge.train.recipe import train

    shutil.rmtree(out / "run", ignore_errors=True)  # the demo always starts fresh
    result = train(config)
    m = result.metrics
    console.print(
        f"{result.status}: {result.steps} steps, train loss {m['train_loss']:.3f}, eval loss {m['eval_loss']:.3f}, "
        f"{m['tokens_per_s']:,.0f} tokens/s\nadapter -> {result.run_dir / 'adapter'}\nloss curve -> {result.run_dir / 'loss.png'}"
    )
