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


def run_demo(out: Path, model: str, console: Console) -> None:
    out = Path(out)
    data = out / "data.jsonl"
    counts = write_demo_data(data)
    console.rule("1. demo data")
    console.print(f"{data}: {counts['good']} good order-extraction samples and {counts['planted']} planted bad ones")
    console.rule("2. gate")
    report = run_gate([data], out / "gated", load_config(overrides={"model.name": model}), show_progress=True)
    console.print(render_table(report))
    console.print(f"kept -> {report.outputs['kept']}\nrejected (with reasons) -> {report.outputs['rejected']}")
