"""The gate's report: counts that always add up, examples per reason, timings; shown as a table."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FileStats(BaseModel):
    path: str
    sha256: str
    input: int = 0
    kept: int = 0
    rejected: int = 0


class Example(BaseModel):
    source: dict[str, Any]
    detail: str


class GateReport(BaseModel):
    input: int = 0
    kept: int = 0
    rejected: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)
    examples: dict[str, list[Example]] = Field(default_factory=dict)
    files: list[FileStats] = Field(default_factory=list)
    model: str = ""
    max_seq_length: int = 0
    thresholds: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)


def render_table(report: GateReport):
    """A rich Table: one row per reason with its share and a first example."""
    from rich.table import Table

    table = Table(title=f"loraforge gate: {report.kept:,} kept, {report.rejected:,} rejected of {report.input:,}")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    table.add_column("first example", overflow="fold", max_width=70)
    total = max(report.input, 1)
    for reason, count in sorted(report.reasons.items(), key=lambda item: -item[1]):
        first = report.examples[reason][0]
        where = ":".join(str(v) for v in first.source.values())
        table.add_row(reason, f"{count:,}", f"{count / total:.1%}", f"{where}  {first.detail[:160]}")
    table.add_row("[bold]kept[/bold]", f"[bold]{report.kept:,}[/bold]", f"{report.kept / total:.1%}", "")
    return table
