"""An ``EvalResult`` as rich tables: metric | base | adapter | delta, the examples, the promotion checks."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from loraforge.eval import EvalResult
from loraforge.eval.metrics import improved



def _delta(metric: str, base: float, adapter: float) -> str:
    delta = adapter - base
    better = improved(metric, base, adapter)
    color = "green" if better else ("red" if delta != 0 else "dim")
    return f"[{color}]{delta:+.4g}[/]"


def metrics_table(result: EvalResult) -> Table:
    table = Table(title=f"eval: {result.data['samples']} samples, task {result.task}")
    for column in ("metric", "base", "adapter", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, adapter in result.adapter.items():
        base = result.base[metric]
        table.add_row(metric, f"{base:.4g}", f"{adapter:.4g}", _delta(metric, base, adapter))
    return table


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")  # answers may hold [brackets]


def examples_table(result: EvalResult) -> Table:
    table = Table(title=f"first {len(result.examples)} examples (✓ = exact match)", show_lines=True)
    for column in ("prompt", "reference", "base", "adapter"):
        table.add_column(column, overflow="fold", ratio=1)
    for e in result.examples:
        mark = {True: "[green]✓[/] ", False: "[red]✗[/] "}
        table.add_row(_short(e["prompt"]), _short(e["reference"]), mark[e["base_correct"]] + _short(e["base"]), mark[e["adapter_correct"]] + _short(e["adapter"]))
    return table


def promotion_lines(result: EvalResult) -> list[str]:
    checks = result.promotion.checks
    if not checks:
        return ["promotion: no requirements given (--require, --require-better-than-base)"]
    lines = [f"{'[green]pass[/]' if c.passed else '[red]FAIL[/]'}  {escape(c.requirement)}: adapter {c.value:.4g}" for c in checks]
    verdict = "[green]promoted[/]: every requirement met" if result.promotion.passed else "[red]not promoted[/]"
    return [*lines, verdict]
