"""The training recipe: ``setup()``, ``train()``, ``cleanup()``, read top to bottom.

One optimizer step = ``grad_accum`` micro-batches. The loss of each micro-batch is its summed
token cross-entropy divided by the supervised tokens of the *whole step*, so uneven
micro-batches (packing makes them uneven) do not change the gradient's scale.

Everything that decides the order of data is a function of (seed, epoch), and every
checkpoint holds the adapter, optimizer, scheduler, RNG states and the step: a run killed at
any moment and resumed from its last checkpoint ends with the same adapter as one never
interrupted.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loraforge.config import LoraforgeConfig
from loraforge.errors import OutOfMemory, PreflightError, TrainError, TrainingDiverged
from loraforge.train import data as data_mod
from loraforge.train import preflight as pf
from loraforge.train.batch import Batch, collate, token_loss_sum
from loraforge.train.model import apply_accelerations, load_base, pick_device, pick_dtype, wrap_lora

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    status: str
    train_loss: float | None
    eval_loss: float | None
    findings: list[pf.Finding] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


class TrainRun:
    def __init__(self, config: LoraforgeConfig, resume: bool = False, show_progress: bool = True, console=None):
        self.config, self.cfg = config, config.train
        self.resume = resume
        self.show_progress = show_progress
        self.console = console
        self.out = Path(self.cfg.out)
        self.step = 0
        self.ema: float | None = None
        self.best_eval = math.inf
        self.bad_evals = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.findings: list[pf.Finding] = []

    # ---- setup ---------------------------------------------------------------------------

    def setup(self, dry_run: bool = False) -> list[pf.Finding]:
        from loraforge.models import load_tokenizer, resolve_model

        cfg = self.cfg
        self.device = pick_device()
        self.dtype = pick_dtype(cfg, self.device)
        self.checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else self.device.type == "cuda"
        self.model_dir = resolve_model(self.config.model.name)
        self.tokenizer = load_tokenizer(str(self.model_dir))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self._setup_data()
        self.findings = self._preflight()
        blocks = [f for f in self.findings if f.level == "block"]
        if blocks and not dry_run:
            raise PreflightError("preflight stopped the run:\n" + "\n".join(f"- {f.check}: {f.message}\n  fix: {f.fix}" for f in blocks))
        if dry_run:
            return self.findings
        self._setup_model()
        self._setup_optimizer()
        if self.resume:
            self._load_checkpoint()
        elif self.out.exists() and any((self.out / "checkpoints").glob("step-*")):
            raise TrainError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another --out")
        return self.findings

    def _training_file(self) -> Path:
        cfg = self.cfg
        if cfg.data is None:
            raise TrainError("no training data: pass --data FILE (raw data is gated first; gate output kept.jsonl is used as is)")
        path = Path(cfg.data)
        if not path.is_file():
            raise TrainError(f"training data {path} does not exist")
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        try:
            record = json.loads(first)
            is_gate_output = isinstance(record, dict) and "messages" in record and "source" in record
        except json.JSONDecodeError:
            is_gate_output = False
        if is_gate_output:
            return path
        from loraforge.gate import run_gate

        gate_config = self.config.model_copy(deep=True)
        gate_config.gate.max_seq_length = cfg.max_seq_length
        run_gate([path], self.out / "gate", gate_config, tokenizer=self.tokenizer)
        return self.out / "gate" / "kept.jsonl"

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.data_file = self._training_file()
        rows = data_mod.read_messages(self.data_file)
        if cfg.eval_data is not None:
            train_rows, eval_rows = rows, data_mod.read_messages(Path(cfg.eval_data))
        else:
            train_rows, eval_rows = data_mod.split_eval(rows, cfg.eval_fraction, cfg.seed)
        tokenize = data_mod.ChatTokenizer(self.tokenizer)
        self.truncated = 0

        def prepare(pairs):
            out = []
            for messages, source in pairs:
                sample = tokenize(messages, source)
                self.truncated += len(sample.input_ids) > cfg.max_seq_length
                sample = data_mod.truncate(sample, cfg.max_seq_length)
                if sample is not None:
                    out.append(sample)
            return out

        self.train_samples, self.eval_samples = prepare(train_rows), prepare(eval_rows)
        self.train_rows = self._rows(self.train_samples)
        self.eval_rows = self._rows(self.eval_samples)
        mb, accum = cfg.micro_batch_size, cfg.grad_accum
        self.micro_batches_per_epoch = math.ceil(len(self.train_rows) / mb) if self.train_rows else 0
        self.steps_per_epoch = max(1, math.ceil(self.micro_batches_per_epoch / accum))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

    def _rows(self, samples) -> list[list[int]]:
        lengths = [len(s.input_ids) for s in samples]
        if self.cfg.packing:
            return data_mod.pack(lengths, self.cfg.max_seq_length)
        return [[i] for i in range(len(samples))]

    def data_stats(self) -> dict:
        lengths = sorted(len(s.input_ids) for s in self.train_samples)
        return {
            "samples": len(lengths),
            "eval_samples": len(self.eval_samples),
            "mean_tokens": float(np.mean(lengths)) if lengths else 0.0,
            "p95_tokens": int(lengths[int(0.95 * (len(lengths) - 1))]) if lengths else 0,
            "max_tokens": lengths[-1] if lengths else 0,
            "supervised_tokens": sum(s.supervised for s in self.train_samples),
            "rows": len(self.train_rows),
            "packing_efficiency": data_mod.packing_efficiency(self.train_rows, [len(s.input_ids) for s in self.train_samples], self.cfg.max_seq_length),
            "truncated": self.truncated,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }

    def _preflight(self) -> list[pf.Finding]:
        from loraforge.train.model import linear_module_names

        cfg = self.cfg
        meta = pf.meta_model(self.model_dir)
        findings = [
            pf.check_target_modules(linear_module_names(meta), cfg.lora),
            pf.check_alpha(cfg.lora),
            pf.check_learning_rate(cfg),
            pf.check_quantization(cfg, self.device),
            pf.check_data(self.data_stats()),
        ]
        seq = min(cfg.max_seq_length, max((sum(len(self.train_samples[i].input_ids) for i in row) for row in self.train_rows), default=16))
        memory, self.memory_estimate = pf.check_memory(meta, cfg, self.dtype, self.device, seq, self.checkpointing)
        findings.append(memory)
        if cfg.lora.dora or cfg.lora.r not in VLLM_RANKS:
            findings.append(pf.Finding("warn", "serving", f"vLLM serves LoRA ranks {VLLM_RANKS} and no DoRA", "use one of those ranks, or serve a merged model (loraforge merge)"))
        findings.append(pf.Finding("ok", "device", f"{self.device.type}, {str(self.dtype).removeprefix('torch.')}, gradient checkpointing {'on' if self.checkpointing else 'off'}"))
        return findings

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.seed)
        base = load_base(self.model_dir, self.cfg, self.device, self.dtype)
        self.accelerations = apply_accelerations(base, self.cfg, self.device)
        self.model = wrap_lora(base, self.cfg, self.checkpointing)

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        warmup = int(self.cfg.warmup_ratio * self.total_steps)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.cfg.scheduler]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    # ---- data order ----------------------------------------------------------------------

    def micro_batches(self, step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step ``step`` (0-based): a pure function."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.train_rows)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        mb, accum = self.cfg.micro_batch_size, self.cfg.grad_accum
        start = within * accum * mb
        chunk = order[start : start + accum * mb]
        return [chunk[i : i + mb] for i in range(0, len(chunk), mb)]

    def batch(self, rows: list[list[int]], row_ids: list[int], samples) -> Batch:
        return collate([[samples[i] for i in rows[r]] for r in row_ids], self.pad_id).to(self.device)

    # ---- train ---------------------------------------------------------------------------

    def train(self) -> TrainResult:
        from loraforge.train.report import MetricsSink

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        sink = MetricsSink(self.out / "metrics.jsonl", cfg.metrics_port, truncate_after=self.step if self.resume else 0)
        status, last_loss, eval_loss = "completed", None, None
        progress = _progress(self.show_progress, self.total_steps, self.step)
        started = time.perf_counter() - self.elapsed
        try:
            with progress:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    loss, tokens, grad_norm = self._train_step()
                    self.step += 1
                    self.tokens_seen += tokens
                    self.elapsed = time.perf_counter() - started
                    last_loss = loss
                    record = {
                        "step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "tokens": tokens, "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9), "elapsed_s": self.elapsed,
                    }
                    if self.device.type == "cuda":
                        record["gpu_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
                    stop = False
                    if self.eval_rows and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                        eval_loss = record["eval_loss"] = self.evaluate()
                        stop = self._early_stop(eval_loss)
                    sink.write(record)
                    progress.update(self.step, loss, record["lr"], record["tokens_per_s"])
                    if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps or stop:
                        self.save_checkpoint()
                    if stop:
                        status = "early_stopped"
                        break
        except torch.cuda.OutOfMemoryError as exc:
            parts = ", ".join(f"{k} {v / pf.GiB:.2f} GiB" for k, v in self.memory_estimate.items())
            raise OutOfMemory(
                f"CUDA out of memory at step {self.step + 1} (estimate: {parts}). Lower train.micro_batch_size "
                "(and raise train.grad_accum), set train.gradient_checkpointing: true, shorten train.max_seq_length, "
                "or use train.quantization: nf4"
            ) from exc
        except TrainingDiverged:
            self.save_adapter(status="diverged")
            raise
        finally:
            sink.close()
        self.save_adapter(status=status)
        return TrainResult(self.out, self.step, status, last_loss, eval_loss, self.findings, self.final_metrics(last_loss, eval_loss))

    def _train_step(self) -> tuple[float, int, float]:
        micro = [self.batch(self.train_rows, ids, self.train_samples) for ids in self.micro_batches(self.step)]
        supervised = sum(b.supervised for b in micro)
        total = 0.0
        for b in micro:
            logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
            loss = token_loss_sum(logits, b.labels) / max(supervised, 1)
            loss.backward()
            total += loss.item()
        self._check_loss(total, micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, sum(b.real_tokens for b in micro), float(grad_norm)

    def _check_loss(self, loss: float, micro: list[Batch]) -> None:
        cfg = self.cfg
        spiked = self.ema is not None and self.step >= cfg.spike_warmup and loss > cfg.spike_factor * self.ema
        if math.isfinite(loss) and not spiked:
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
            return
        self.optimizer.zero_grad(set_to_none=True)  # the bad gradient is never applied
        sources = [self.train_samples[i].source for ids in self.micro_batches(self.step) for r in ids for i in self.train_rows[r]][:5]
        what = f"loss {loss}" if not math.isfinite(loss) else f"loss {loss:.3f} is {loss / self.ema:.1f}x its running average {self.ema:.3f}"
        raise TrainingDiverged(
            f"training stopped at step {self.step + 1}: {what}. The adapter of step {self.step} (the last good weights) "
            f"is saved in {self.out / 'adapter'}. Likely causes: learning rate too high (train.lr {cfg.lr:g}; try half); "
            f"fp16 overflow (use bf16 or fp32); broken samples in this batch, first ones from {sources}; "
            "NaN / inf in the base weights"
        )

    def _early_stop(self, eval_loss: float) -> bool:
        if eval_loss < self.best_eval - 1e-6:
            self.best_eval, self.bad_evals = eval_loss, 0
            return False
        self.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        loss_sum, supervised = 0.0, 0
        mb = self.cfg.micro_batch_size
        for start in range(0, len(self.eval_rows), mb):
            b = self.batch(self.eval_rows, list(range(start, min(start + mb, len(self.eval_rows)))), self.eval_samples)
            logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
            loss_sum += float(token_loss_sum(logits, b.labels))
            supervised += b.supervised
        self.model.train()
        return loss_sum / max(supervised, 1)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, keep: int = 2) -> Path:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        staging = root / f".tmp-step-{self.step:07d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.model).items()}
        save_file(state, staging / "adapter_model.safetensors")
        torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        meta = {"step": self.step, "ema": self.ema, "best_eval": self.best_eval, "bad_evals": self.bad_evals,
                "tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "total_steps": self.total_steps}
        (staging / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # atomic: a kill leaves either the old or the new checkpoint, never half of one
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        found = sorted((self.out / "checkpoints").glob("step-*"))
        if not found:
            raise TrainError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume")
        ckpt = found[-1]
        set_peft_model_state_dict(self.model, load_file(ckpt / "adapter_model.safetensors", device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=False))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        rng = torch.load(ckpt / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        meta = json.loads((ckpt / "state.json").read_text())
        self.step, self.ema, self.best_eval = meta["step"], meta["ema"], meta["best_eval"]
        self.bad_evals, self.tokens_seen, self.elapsed = meta["bad_evals"], meta["tokens_seen"], meta["elapsed"]

    # ---- outputs -------------------------------------------------------------------------

    def final_metrics(self, train_loss, eval_loss) -> dict:
        metrics = {"steps": self.step, "train_loss": train_loss, "eval_loss": eval_loss, "tokens": self.tokens_seen,
                   "elapsed_s": round(self.elapsed, 3), "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9)}
        if self.device.type == "cuda":
            metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        return metrics

    def save_adapter(self, status: str) -> None:
        from loraforge.train.report import plot_loss, write_manifest

        adapter = self.out / "adapter"
        self.model.save_pretrained(adapter)
        self.tokenizer.save_pretrained(adapter)  # the chat template serving must use
        write_manifest(self, status)
        plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")


def train(config: LoraforgeConfig, resume: bool = False, dry_run: bool = False, show_progress: bool = True) -> TrainResult:
    run = TrainRun(config, resume=resume, show_progress=show_progress)
    findings = run.setup(dry_run=dry_run)
    if dry_run:
        return TrainResult(run.out, 0, "dry_run", None, None, findings, {"data": run.data_stats(), "memory_estimate": run.memory_estimate})
    return run.train()


class _progress:
    """A rich progress bar with loss, learning rate and tokens/s (or nothing)."""

    def __init__(self, show: bool, total: int, done: int):
        self.bar = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress("train", BarColumn(), MofNCompleteColumn(), "{task.description}", TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task("", total=total, completed=done)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)
        return False

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, description=f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s")
