"""What a run leaves behind: metrics.jsonl (+ a Prometheus endpoint), manifest.json, loss.png."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


class MetricsSink:
    """Every step to metrics.jsonl; with a port, the latest values as Prometheus gauges too.

    With several processes only rank 0 has a sink: GPU memory and utilization of every rank
    reach it in the step's record (``*_per_rank``) and are served with a ``rank`` label on this
    one port.
    """

    def __init__(self, path: Path, port: int | None, truncate_after: int = 0, ranks: int = 1):
        self.path = path
        kept = []
        if truncate_after and path.exists():  # a resumed run continues the file from its checkpoint
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= truncate_after]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")
        self.gauges = _start_prometheus(port) if port else None
        if self.gauges:
            for rank in range(ranks):  # 0 until measured: a CPU run exports 0 GPU memory and utilization
                self.gauges["gpu_mem"].labels(rank=str(rank)).set(0)
                self.gauges["gpu_util"].labels(rank=str(rank)).set(0)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.gauges:
            self.gauges["loss"].set(record["loss"])
            self.gauges["lr"].set(record["lr"])
            self.gauges["grad_norm"].set(record["grad_norm"])
            self.gauges["tps"].set(record["tokens_per_s"])
            memory = record.get("gpu_memory_allocated_bytes_per_rank") or [record.get("gpu_memory_allocated_bytes")]
            utilization = record.get("gpu_utilization_per_rank") or []
            for rank, value in enumerate(memory):
                if value is not None:
                    self.gauges["gpu_mem"].labels(rank=str(rank)).set(value)
            for rank, value in enumerate(utilization):
                if value is not None:
                    self.gauges["gpu_util"].labels(rank=str(rank)).set(value)

    def close(self) -> None:
        self.file.close()


def _start_prometheus(port: int) -> dict:
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    gauges = training_gauges(registry)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return gauges


def training_gauges(registry) -> dict:
    """The training gauges, registered in ``registry`` (no server: tests list what is exported)."""
    from prometheus_client import Gauge

    return {
        "loss": Gauge("loraforge_train_loss", "Training loss of the last optimizer step", registry=registry),
        "lr": Gauge("loraforge_train_learning_rate", "Learning rate of the last step", registry=registry),
        "grad_norm": Gauge("loraforge_train_grad_norm", "Gradient norm before clipping", registry=registry),
        "tps": Gauge("loraforge_train_tokens_per_second", "Training throughput of the last step", registry=registry),
        # one series per training process (rank 0 serves them all)
        "gpu_mem": Gauge("loraforge_gpu_memory_allocated_bytes", "Peak GPU memory allocated by PyTorch", ["rank"], registry=registry),
        "gpu_util": Gauge("loraforge_gpu_utilization_ratio", "GPU utilization (NVML), 0-1", ["rank"], registry=registry),
    }


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none when it does not exist); a bad line names itself."""
    from loraforge.errors import InputError

    rows = []
    if not path.exists():
        return rows
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def tokens_per_second(rows: list[dict]) -> float:
    """The rate over these metrics rows: their tokens over the wall time of their steps."""
    return sum(r["tokens"] for r in rows) / sum(r["tokens"] / r["tokens_per_s"] for r in rows)


def draw_loss(ax, rows: list[dict]) -> None:
    """Train loss per step and eval loss where measured, on one matplotlib axis."""
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.legend()
    ax.grid(alpha=0.3)


def plot_loss(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_loss(ax, read_metrics(metrics))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _sha256(path: Path) -> str:
    from loraforge.gate.readers import sha256_of

    return sha256_of(path)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(run, status: str) -> None:
    import torch

    versions = {}
    for name in ("loraforge", "torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "liger-kernel"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hardware = {"device": run.device.type, "dtype": str(run.dtype).removeprefix("torch."), "cpus": os.cpu_count(), "platform": platform.platform(),
                "processes": run.dist.world, "strategy": run.strategy}
    if run.device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(run.device)
    manifest = {
        "status": status,
        "model": run.config.model.name,
        "model_dir": str(run.model_dir),
        "config": run.config.model_dump(mode="json"),
        "data": {"file": str(run.data_file), "sha256": _sha256(run.data_file), **run.data_stats()},
        "versions": versions,
        "git_commit": _git_commit(),
        "hardware": hardware,
        "accelerations": getattr(run, "accelerations", []),
        "preflight": [f.__dict__ for f in run.findings],
        "final_metrics": run.final_metrics(None, None) | _last_losses(run.out / "metrics.jsonl"),
    }
    (run.out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _last_losses(metrics: Path) -> dict:
    rows = read_metrics(metrics)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"train_loss": rows[-1]["loss"] if rows else None, "first_train_loss": rows[0]["loss"] if rows else None, "eval_loss": evals[-1] if evals else None}
