"""``loraforge report RUN_DIR``: one self-contained ``report.html`` for a run.

What it reads, all optional except the run itself (a section whose file is missing says so
instead of vanishing, so a reader knows what was not measured):

==================  =======================================================================
``manifest.json``   model, data, versions, hardware, final metrics (written by ``train``)
``metrics.jsonl``   the loss, learning-rate and throughput curves (written by ``train``)
gate ``report.json``  kept / rejected per reason with examples: found beside the training
                    data (``manifest.data.file``'s folder), or given with ``--gate``
``eval.json``       base vs adapter metrics and example outputs (written by ``eval``)
``serving.json``    request latencies measured against the served adapter (written by
                    ``demo``; schema: ``{"requests": [{"route", "latency_ms", "ok"}]}``)
==================  =======================================================================

Plots are PNGs from matplotlib inlined as base64 ``data:`` URIs, the HTML comes from a Jinja2
template with autoescaping (every string from the data is escaped), and the page carries no
external resource: it opens from a mail attachment as well as from disk. A few lines of
inline script mark ``<body data-rendered>`` once every image has decoded, which is what the
headless-browser test checks.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from loraforge.errors import InputError
from loraforge.eval.metrics import improved
from loraforge.train.report import draw_loss, read_metrics

__all__ = ["collect", "write_report"]


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from exc


def _gate_report_path(manifest: dict | None, gate: Path | None) -> Path | None:
    if gate is not None:
        return gate / "report.json" if gate.is_dir() else gate
    data_file = ((manifest or {}).get("data") or {}).get("file")
    if data_file:
        candidate = Path(data_file).parent / "report.json"
        if candidate.exists():
            return candidate
    return None


def collect(run_dir: Path | str, gate: Path | str | None = None) -> dict:
    """Everything the report shows, as plain data (the HTML is only its rendering)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory (expected the --out of `loraforge train`)")
    manifest = _read_json(run_dir / "manifest.json")
    gate_path = _gate_report_path(manifest, Path(gate) if gate else None)
    return {
        "run_dir": str(run_dir),
        "manifest": manifest,
        "metrics": read_metrics(run_dir / "metrics.jsonl"),
        "gate": _read_json(gate_path) if gate_path else None,
        "gate_path": str(gate_path) if gate_path else None,
        "eval": _read_json(run_dir / "eval.json"),
        "serving": _read_json(run_dir / "serving.json"),
    }


# ----------------------------------------------------------------------------- plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot(rows: list[dict]) -> str | None:
    if not rows:
        return None
    plt = _pyplot()
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    draw_loss(ax, rows)
    ax.set_title("loss")
    ax_lr.plot([r["step"] for r in rows], [r.get("lr", 0) for r in rows], color="tab:green")
    ax_lr.set(xlabel="optimizer step", title="learning rate")
    ax_lr.grid(alpha=0.3)
    return _png(fig)


def rejection_plot(gate: dict | None) -> str | None:
    if not gate or not gate.get("input"):
        return None
    plt = _pyplot()
    reasons = sorted(gate.get("reasons", {}).items(), key=lambda item: item[1])
    labels = [r for r, _ in reasons] + ["kept"]
    counts = [c for _, c in reasons] + [gate.get("kept", 0)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.2))
    bars = ax.barh(labels, counts, color=["tab:red"] * len(reasons) + ["tab:green"])
    ax.bar_label(bars, padding=3)
    ax.set_xscale("symlog")
    ax.set(xlabel="samples (log scale)", title=f"gate: {gate.get('kept', 0):,} kept of {gate['input']:,}")
    return _png(fig)


def latency_plot(serving: dict | None) -> str | None:
    requests = (serving or {}).get("requests") or []
    if not requests:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    routes = sorted({r["route"] for r in requests})
    for route in routes:
        values = [r["latency_ms"] for r in requests if r["route"] == route and r.get("ok", True)]
        ax.hist(values, bins=min(30, max(5, len(values))), alpha=0.6, label=f"{route} ({len(values)})")
    ax.set(xlabel="latency (ms)", ylabel="requests", title="request latency by route")
    ax.legend()
    return _png(fig)


# ----------------------------------------------------------------------------- numbers


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def latency_table(serving: dict | None) -> list[dict]:
    requests = (serving or {}).get("requests") or []
    rows = []
    for route in sorted({r["route"] for r in requests}):
        ok = [r["latency_ms"] for r in requests if r["route"] == route and r.get("ok", True)]
        failed = sum(1 for r in requests if r["route"] == route and not r.get("ok", True))
        if ok:
            rows.append(
                {"route": route, "requests": len(ok), "failed": failed, "p50": _percentile(ok, 0.5), "p99": _percentile(ok, 0.99), "mean": statistics.fmean(ok)}
            )
    return rows


def eval_table(evaluation: dict | None) -> list[dict]:
    """One row per metric both sides report: base, adapter, delta and which side is better."""
    if not evaluation:
        return []
    base, adapter = evaluation.get("base", {}), evaluation.get("adapter", {})
    rows = []
    for name in adapter:
        b, a = base.get(name), adapter[name]
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            continue
        better = improved(name, b, a)
        rows.append({"metric": name, "base": b, "adapter": a, "delta": a - b, "better": better, "worse": a != b and not better})
    return rows


def summary(data: dict, latency_rows: list[dict]) -> list[tuple[str, str]]:
    """The few lines a reader wants first, as (label, value); ``latency_rows`` from ``latency_table``."""
    lines = []
    manifest, gate, evaluation = data["manifest"] or {}, data["gate"], data["eval"]
    if manifest:
        lines.append(("model", str(manifest.get("model"))))
        final = manifest.get("final_metrics", {})
        if final.get("train_loss") is not None:
            lines.append(("train loss", f"{final.get('first_train_loss', float('nan')):.3f} -> {final['train_loss']:.3f}"))
        if final.get("tokens_per_s"):
            lines.append(("training throughput", f"{final['tokens_per_s']:,.0f} tokens/s on {manifest.get('hardware', {}).get('device', '?')}"))
    if gate:
        lines.append(("gate", f"{gate.get('kept', 0):,} kept, {gate.get('rejected', 0):,} rejected of {gate.get('input', 0):,}"))
    if evaluation:
        promotion = evaluation.get("promotion") or {}
        verdict = "passed" if promotion.get("passed") else ("failed" if promotion else "not checked")
        lines.append(("promotion gate", verdict))
    for row in latency_rows:
        lines.append((f"latency {row['route']}", f"p50 {row['p50']:.0f} ms, p99 {row['p99']:.0f} ms ({row['requests']} requests)"))
    return lines


# ----------------------------------------------------------------------------- HTML


def _template():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("loraforge.report", "templates"),
        autoescape=True,  # every string in the page comes from data files
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _num
    env.filters["pretty"] = lambda value: json.dumps(value, indent=1, ensure_ascii=False) if not isinstance(value, str) else value
    return env.get_template("report.html.j2")


def _num(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def render(data: dict) -> str:
    gate = data["gate"]
    latency_rows = latency_table(data["serving"])
    return _template().render(
        data=data,
        title=f"loraforge run report: {Path(data['run_dir']).name}",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        summary=summary(data, latency_rows),
        loss_png=loss_plot(data["metrics"]),
        rejection_png=rejection_plot(gate),
        latency_png=latency_plot(data["serving"]),
        eval_rows=eval_table(data["eval"]),
        latency_rows=latency_rows,
        gate_reasons=sorted((gate or {}).get("reasons", {}).items(), key=lambda item: -item[1]),
    )


def write_report(run_dir: Path | str, out: Path | str | None = None, gate: Path | str | None = None) -> Path:
    """Write ``report.html`` (default: inside the run directory) and return its path."""
    data = collect(run_dir, gate)
    out = Path(out) if out else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out
