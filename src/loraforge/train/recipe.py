"""The training recipe: ``setup()``, ``train()``, ``cleanup()``, read top to bottom.

One optimizer step = ``grad_accum`` micro-batches. The loss of each micro-batch is its summed
token cross-entropy divided by the supervised tokens of the *whole step*, so uneven
micro-batches (packing makes them uneven) do not change the gradient's scale.

Everything that decides the order of data is a function of (seed, epoch), dropout's random
numbers a function of (seed, step, rank), and every checkpoint holds the adapter, optimizer,
scheduler and the step: a run killed at any moment and resumed from its last checkpoint ends
with the same adapter as one never interrupted.

With W processes (``--gpus N``, torchrun), one step takes the rows a single process would
take with the same global batch, each rank a disjoint share of its micro-batches, and the
gradient is exactly the single-process one: ``distributed.py`` has the arithmetic.
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
from loraforge.train import attention
from loraforge.train import distributed as dist_mod
from loraforge.train import fused_lora
from loraforge.train import memory
from loraforge.train import preflight as pf
from loraforge.train.batch import Batch, collate, collate_flat, padding_batch
from loraforge.train.data import IGNORE
from loraforge.train.loss import CausalLMLoss
from loraforge.train.model import apply_accelerations, load_base, pick_dtype, wrap_lora

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


@dataclass
class _Step:
    """An optimizer step launched on the device; ``TrainRun._finish_step`` reads its numbers."""

    index: int  # 0-based
    lr: float  # the learning rate it used
    seconds: float  # how long it took (on the GPU's clock once read, where ``started`` is set)
    read: tuple | None = None  # the synchronous guard's numbers, read at launch
    host: torch.Tensor | None = None  # the device guard's: loss, grad norm, tripped, average before and after
    started: torch.cuda.Event | None = None  # CUDA: before the step's first work, or the end of the step it was queued behind
    done: torch.cuda.Event | None = None  # and after the copy of ``host``
    local: tuple = ()  # the device guard's: this process's tokens, peak memory, GPU utilization


class TrainRun:
    def __init__(self, config: LoraforgeConfig, resume: bool = False, show_progress: bool = True, console=None, processes: int | None = None):
        self.config, self.cfg = config, config.train
        # WORLD_SIZE / RANK / LOCAL_RANK from torchrun; ``processes`` only plans a --dry-run
        self.dist = dist_mod.Dist.from_env()
        self.planned_only = not self.dist.enabled and bool(processes and processes > 1)
        if self.planned_only:
            self.dist = dist_mod.Dist(world=processes, local_world=processes)
        self.strategy = "single"
        self.checkpoint: Path | None = None
        self.peak_memory_per_rank: list[int] = []
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
        if self.planned_only and not dry_run:
            raise TrainError(f"{self.dist.world} processes are only planned here: start them with `loraforge train --gpus {self.dist.world}` or torchrun")
        self.device = dist_mod.device_of(self.dist) if dry_run else dist_mod.init(self.dist)
        self.dtype = pick_dtype(cfg, self.device)
        # the speed levers (issue 7), each with its switch: padding-free rows with varlen attention,
        # the loss without logits, the memory planner's recomputation (decided in _preflight)
        self.flat = cfg.attention == "varlen" or (cfg.attention == "auto" and attention.available(self.device))
        self.fused_loss = cfg.fused_loss if cfg.fused_loss is not None else self.device.type == "cuda"
        self.fused_lora = cfg.fused_lora if cfg.fused_lora is not None else self.device.type == "cuda"
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
        if self.resume:
            self.checkpoint = self._latest_checkpoint()
        elif self.out.exists() and any((self.out / "checkpoints").glob("step-*")):
            raise TrainError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another --out")
        self._setup_model()
        self._setup_optimizer()
        if self.checkpoint:
            self._load_checkpoint()
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

        if self.dist.main:  # one gate run; the other ranks read its output
            gate_config = self.config.model_copy(deep=True)
            gate_config.gate.max_seq_length = cfg.max_seq_length
            run_gate([path], self.out / "gate", gate_config, tokenizer=self.tokenizer)
        dist_mod.barrier(self.dist)
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

        self.use_samples(prepare(train_rows), prepare(eval_rows))

    def use_samples(self, train_samples: list, eval_samples: list) -> None:
        """Rows, batch and step counts for these tokenized samples (``loraforge bench train``
        hands its own samples in here instead of a data file)."""
        cfg = self.cfg
        self.train_samples, self.eval_samples = train_samples, eval_samples
        # loss-carrying tokens of each sample once collated (its first token never is)
        self.sample_supervised = [s.supervised - (s.labels[0] != IGNORE) for s in self.train_samples]
        self.train_rows = self._rows(self.train_samples)
        self.eval_rows = self._rows(self.eval_samples)
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * self.dist.world  # rows per optimizer step
        self.steps_per_epoch = max(1, math.ceil(len(self.train_rows) / self.global_batch))
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
            "processes": self.dist.world,
            "global_batch_rows": self.global_batch,
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
        self.memory_plan = pf.plan_memory(meta, cfg, self.dtype, self.device, seq, self.fused_loss, self.flat)
        if cfg.adapter_dtype is None:  # the plan's choice is the run's (and the manifest's)
            self.cfg = cfg = cfg.model_copy(update={"adapter_dtype": self.memory_plan.adapter_dtype})
            self.config = self.config.model_copy(update={"train": cfg})
        self.checkpointing = self.memory_plan.checkpointed > 0
        if cfg.attention == "varlen" and self.device.type == "cuda" and not attention.available(self.device):
            findings.append(pf.Finding("block", "attention", f"train.attention: varlen, but torch {torch.__version__} has no flash varlen kernel", "train.attention: auto (or sdpa), or torch >= 2.10"))
        if self.dist.enabled:
            strategy, memory_finding, self.strategy, self.memory_estimate = pf.plan_strategy(
                meta, cfg, self.dtype, self.device, seq, self.checkpointing, self.dist.world, self.dist.local_world, parts=self.memory_plan.estimate
            )
            findings.append(strategy)
        else:
            memory_finding, self.memory_estimate = pf.check_memory(meta, cfg, self.dtype, self.device, seq, self.checkpointing, parts=self.memory_plan.estimate)
        findings.append(memory_finding)
        findings.append(pf.Finding("ok", "memory_plan", self.memory_plan.describe()))
        if cfg.lora.dora or cfg.lora.r not in VLLM_RANKS:
            findings.append(pf.Finding("warn", "serving", f"vLLM serves LoRA ranks {VLLM_RANKS} and no DoRA", "use one of those ranks, or serve a merged model (loraforge merge)"))
        layout = "padding-free rows, varlen attention" if self.flat else "padded rows, SDPA with a block mask"
        loss = "fused with the LM head (no logits tensor)" if self.fused_loss else "from full logits"
        findings.append(pf.Finding("ok", "device", f"{self.device.type}, {str(self.dtype).removeprefix('torch.')}; {layout}; loss {loss}"))
        return findings

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.seed)  # the same LoRA initialization on every rank
        base = self._load_base()
        self.accelerations = apply_accelerations(base, self.cfg, self.device)
        self.model = wrap_lora(base, self.cfg, self.checkpointing)
        fuse = self.fused_lora and self.strategy != "fsdp"  # FSDP's sharded parameters: PEFT's forward
        if self.checkpointing:
            memory.apply(self.model, self.memory_plan, blocks=fuse)
        if fuse:
            fused, skipped = fused_lora.apply(self.model, nf4_kernel=self.cfg.nf4_kernel)
            groups = fused_lora.group(self.model) if self.cfg.grouped_lora else 0
            shared = f", {groups} groups sharing an input" if groups else ""
            self.accelerations.append(f"fused LoRA: {fused} layers{shared}" + "".join(f", {n} kept PEFT's ({why})" for why, n in skipped.items()))
            if self.cfg.quantization == "nf4":
                self.accelerations.append(f"NF4 dequantization: {fused_lora.dequantizer(self.model)}")
        if self.checkpoint:  # full weights, before FSDP shards them
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(self.checkpoint / "adapter_model.safetensors"))
        # what each step calls: tokens in, summed loss out (wrapped for DDP / FSDP)
        self.engine = dist_mod.wrap(CausalLMLoss(self.model, self.fused_loss), self.strategy, self.dist, self.device)

    def _load_base(self):
        attn = attention.register() if self.flat else "sdpa"
        return load_base(self.model_dir, self.cfg, self.device, self.dtype, sharded=self.strategy == "fsdp", attn_implementation=attn)

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        fused = self.strategy != "fsdp"  # sharded (DTensor) parameters: foreach
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        # fused AdamW skips an update on the device when its ``found_inf`` is set (the protocol of
        # torch's GradScaler): the loss guard then needs no answer from the GPU before the update,
        # and the next step can be queued before this one is read (``_launch_step``). Several
        # processes keep the synchronous guard (their numbers are gathered anyway).
        self.device_guard = fused and not self.dist.enabled
        # queue ahead on the GPU only: on the CPU the launch does the work, so running ahead
        # would only log every step one step late
        self.run_ahead = self.device_guard and self.device.type == "cuda"
        self._ema_dev: torch.Tensor | None = None  # the guard's running average (NaN: none yet)
        self._tripped: torch.Tensor | None = None  # 1 once a step was bad: every later update is skipped too
        warmup = int(self.cfg.warmup_ratio * self.total_steps)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.cfg.scheduler]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    # ---- data order ----------------------------------------------------------------------

    def global_micro_batches(self, step: int) -> list[list[int]]:
        """Row indices of every micro-batch of optimizer step ``step`` (0-based), all ranks
        together: a pure function of (seed, epoch, step), whatever the number of processes."""
        epoch, within = divmod(step, self.steps_per_epoch)
        chunk = self._epoch_order(epoch)[within * self.global_batch : (within + 1) * self.global_batch]
        mb = self.cfg.micro_batch_size
        return [chunk[i : i + mb] for i in range(0, len(chunk), mb)]

    def _epoch_order(self, epoch: int) -> list[int]:
        """The rows of ``epoch`` in order, shuffled once per epoch (not once per step)."""
        if getattr(self, "_order_epoch", None) != epoch:
            order = list(range(len(self.train_rows)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step`` (``[]``: a padding pass)."""
        return dist_mod.shard_micro_batches(self.global_micro_batches(step), self.dist.rank, self.dist.world)

    def supervised_tokens(self, micro: list[list[int]]) -> int:
        """Tokens carrying loss in these rows (as ``collate`` labels them: never a sample's first)."""
        return sum(self.sample_supervised[i] for ids in micro for r in ids for i in self.train_rows[r])

    def batch(self, rows: list[list[int]], row_ids: list[int], samples) -> Batch:
        if not row_ids:
            return padding_batch(self.pad_id, flat=self.flat).to(self.device)
        chosen = [[samples[i] for i in rows[r]] for r in row_ids]
        return (collate_flat(chosen) if self.flat else collate(chosen, self.pad_id)).to(self.device)

    # ---- train ---------------------------------------------------------------------------

    def train(self) -> TrainResult:
        from loraforge.train.report import MetricsSink

        cfg, main = self.cfg, self.dist.main
        self.out.mkdir(parents=True, exist_ok=True)
        # metrics, progress, manifest and plots: rank 0 only (it has every rank's numbers)
        sink = MetricsSink(self.out / "metrics.jsonl", cfg.metrics_port, truncate_after=self.step if self.resume else 0, ranks=self.dist.world) if main else None
        status, last_loss, eval_loss = "completed", None, None
        progress = _progress(self.show_progress and main, self.total_steps, self.step)
        started = time.perf_counter() - self.elapsed
        self._launching, ahead = self.step, None
        try:
            with progress:
                while self.step < self.total_steps:
                    current = ahead if ahead is not None else self._launch_step(self.step)
                    # queue the next step before reading this one: the GPU goes on while this
                    # one's numbers are logged (``_may_run_ahead`` says where it must not)
                    ahead = self._launch_step(self.step + 1) if self._may_run_ahead(self.step + 1) else None
                    if ahead is not None and current.done is not None:
                        ahead.started = current.done  # queued behind it: timed from its end, so a
                        # GPU waiting for the host between the two still counts
                    loss, tokens, grad_norm, ranks = self._finish_step(current)
                    now = time.perf_counter()
                    self.step += 1
                    self.tokens_seen += tokens
                    self.elapsed = now - started
                    last_loss = loss
                    record = {
                        "step": self.step, "loss": loss, "lr": current.lr, "grad_norm": grad_norm,
                        "tokens": tokens, "tokens_per_s": tokens / max(current.seconds, 1e-9), "elapsed_s": self.elapsed,
                    }
                    if self.device.type == "cuda":
                        self.peak_memory_per_rank = [int(r[2]) for r in ranks]
                        record["gpu_memory_allocated_bytes"] = self.peak_memory_per_rank[0]
                        if self.dist.enabled:
                            record["gpu_memory_allocated_bytes_per_rank"] = self.peak_memory_per_rank
                        if cfg.metrics_port:  # measured in the step (every rank's, gathered): not again here
                            record["gpu_utilization_per_rank"] = [r[3] if r[3] >= 0 else None for r in ranks]
                    stop = False
                    if self._evaluates_at(self.step):
                        eval_loss = record["eval_loss"] = self.evaluate()
                        stop = self._early_stop(eval_loss)
                    if sink:
                        sink.write(record)
                    progress.update(self.step, loss, record["lr"], record["tokens_per_s"])
                    if self._checkpoints_at(self.step) or stop:
                        self.save_checkpoint()
                    if stop:
                        status = "early_stopped"
                        break
        except torch.cuda.OutOfMemoryError as exc:
            parts = ", ".join(f"{k} {v / pf.GiB:.2f} GiB" for k, v in self.memory_estimate.items())
            raise OutOfMemory(
                f"CUDA out of memory at step {self._launching + 1} (estimate: {parts}; plan: {self.memory_plan.describe()}). "
                "Lower train.memory_budget_gib (the planner then recomputes more layers, and offloads their inputs "
                "at the lowest), lower train.micro_batch_size (and raise train.grad_accum), shorten train.max_seq_length, "
                "or use train.quantization: nf4"
            ) from exc
        except TrainingDiverged:
            self.save_adapter(status="diverged")
            raise
        finally:
            if sink:
                sink.close()
        self.save_adapter(status=status)
        return TrainResult(self.out, self.step, status, last_loss, eval_loss, self.findings, self.final_metrics(last_loss, eval_loss))

    def _launch_step(self, step: int) -> "_Step":
        """Queue optimizer step ``step`` (0-based): this rank's micro-batches, each loss divided by
        the supervised tokens of the whole step (all ranks), times the world size that gradient
        averaging divides by again, then the update. With the device guard nothing here waits
        for the GPU; ``_finish_step`` reads the numbers."""
        self._launching, launched = step, time.perf_counter()
        cuda = self.device.type == "cuda"
        # on the GPU's clock: from where the GPU reaches this step (behind the one before, when
        # queued early) to its end; the host's clock only says when the launch returned
        started = torch.cuda.Event(enable_timing=True) if cuda and self.device_guard else None
        if started is not None:
            started.record()
        world = self.dist.world
        micro = self.global_micro_batches(step)
        supervised = max(self.supervised_tokens(micro), 1)  # the same on every rank
        mine = dist_mod.shard_micro_batches(micro, self.dist.rank, self.dist.world)
        torch.manual_seed((self.cfg.seed * 1_000_003 + step) * 1_009 + self.dist.rank)  # dropout: f(seed, step, rank)
        loss_sum, tokens = torch.zeros((), dtype=torch.float32, device=self.device), 0
        for i, ids in enumerate(mine):
            b = self.batch(self.train_rows, ids, self.train_samples)
            with dist_mod.no_sync(self.engine, last=i == len(mine) - 1):
                loss = self.engine(input_ids=b.input_ids, labels=b.labels, **b.model_kwargs()) / supervised
                (loss * world).backward()
            loss_sum += loss.detach()
            tokens += b.real_tokens
        memory = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        utilization = _gpu_utilization(self.device) if cuda and self.cfg.metrics_port else -1
        lr = self.scheduler.get_last_lr()[0]
        if not self.device_guard:
            ranks = dist_mod.gather_stats(self.dist, [float(loss_sum), tokens, memory, utilization], self.device)
            total = sum(r[0] for r in ranks)
            grad_norm = float(dist_mod.clip_gradients(self.params, self.cfg.max_grad_norm))
            self._check_loss(total, step, grad_norm)  # the same on every rank: all stop together or none
            self._update()
            read = (total, int(sum(r[1] for r in ranks)), grad_norm, ranks)
            return _Step(step, lr, time.perf_counter() - launched, read=read)  # it waited for the GPU: the host's clock
        grad_norm = dist_mod.clip_gradients(self.params, self.cfg.max_grad_norm)
        before = self._guard(loss_sum, grad_norm, step)
        self.optimizer.found_inf = self._tripped  # a bad step (or any after it) changes nothing
        self._update()
        numbers = torch.stack([loss_sum.float(), grad_norm.float(), self._tripped, before, self._ema_dev])
        host = torch.empty(numbers.shape, pin_memory=cuda)
        host.copy_(numbers, non_blocking=cuda)
        local = (tokens, memory, utilization)
        if started is None:  # the CPU: the launch did the work
            return _Step(step, lr, time.perf_counter() - launched, host=host, local=local)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return _Step(step, lr, 0.0, host=host, started=started, done=done, local=local)

    def _update(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _guard(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """``_check_loss`` on the device: trips (for good) on a non-finite loss or gradient or a
        spike, and keeps the running average of good losses. Returns the average before this step."""
        cfg = self.cfg
        if self._ema_dev is None:  # torch.full: no copy from the host, which would wait for the GPU
            self._ema_dev = torch.full((), math.nan if self.ema is None else self.ema, dtype=torch.float32, device=self.device)
            self._tripped = torch.zeros((), dtype=torch.float32, device=self.device)  # found_inf is read as fp32
        before = self._ema_dev
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if step >= cfg.spike_warmup:  # NaN (no average yet) compares False: no spike
            ok &= ~(loss > cfg.spike_factor * before)
        self._ema_dev = torch.where(ok, torch.where(torch.isnan(before), loss, 0.9 * before + 0.1 * loss), before)
        self._tripped = torch.maximum(self._tripped, (~ok).float())
        return before

    def _evaluates_at(self, done: int) -> bool:
        """Whether the loop evaluates once ``done`` steps are done."""
        return bool(self.eval_rows) and (done % self.cfg.eval_every == 0 or done == self.total_steps)

    def _checkpoints_at(self, done: int) -> bool:
        """Whether the loop writes a checkpoint once ``done`` steps are done (or it stops early)."""
        return done % self.cfg.checkpoint_every == 0 or done == self.total_steps

    def _may_run_ahead(self, step: int) -> bool:
        """Whether step ``step`` may be queued before step ``step - 1`` is read: on the GPU with
        the device guard, and not where step ``step - 1``'s weights must be seen first (an
        evaluation, a checkpoint, the end). Once step ``step - 1`` is read, ``step`` steps are done."""
        return self.run_ahead and step < self.total_steps and not (self._evaluates_at(step) or self._checkpoints_at(step))

    def _finish_step(self, s: "_Step") -> tuple[float, int, float, list[list[float]]]:
        """Loss, tokens (all ranks), gradient norm and per-rank numbers of a launched step,
        waiting for it if needed; raises ``TrainingDiverged`` if its guard tripped."""
        if s.read is not None:
            return s.read
        if s.done is not None:
            s.done.synchronize()  # this step only: work queued after it goes on
            s.seconds = s.started.elapsed_time(s.done) / 1e3
        loss, grad_norm, tripped, before, after = s.host.tolist()
        if tripped:
            self.ema = None if math.isnan(before) else before
            self._diverged(loss, s.index, grad_norm)
        self.ema = None if math.isnan(after) else after
        tokens, memory, utilization = s.local
        return loss, tokens, grad_norm, [[loss, tokens, memory, utilization]]

    def _check_loss(self, loss: float, step: int, grad_norm: float) -> None:
        cfg = self.cfg
        spiked = self.ema is not None and step >= cfg.spike_warmup and loss > cfg.spike_factor * self.ema
        if math.isfinite(loss) and math.isfinite(grad_norm) and not spiked:
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
            return
        self.optimizer.zero_grad(set_to_none=True)  # the bad gradient is never applied
        self._diverged(loss, step, grad_norm)

    def _diverged(self, loss: float, step: int, grad_norm: float) -> None:
        cfg = self.cfg
        sources = [self.train_samples[i].source for ids in self.global_micro_batches(step) for r in ids for i in self.train_rows[r]][:5]
        if not math.isfinite(loss):
            what = f"loss {loss}"
        elif not math.isfinite(grad_norm):  # a finite loss whose backward overflowed
            what = f"gradient norm {grad_norm} (loss {loss:.3f})"
        else:
            what = f"loss {loss:.3f} is {loss / self.ema:.1f}x its running average {self.ema:.3f}"
        raise TrainingDiverged(
            f"training stopped at step {step + 1}: {what}. The adapter of step {step} (the last good weights) "
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
        """Mean token loss on the held-out rows; ranks share the micro-batches and sum."""
        self.model.eval()
        loss_sum, supervised = 0.0, 0
        mb, n = self.cfg.micro_batch_size, len(self.eval_rows)
        batches = [list(range(start, min(start + mb, n))) for start in range(0, n, mb)]
        for ids in dist_mod.shard_micro_batches(batches, self.dist.rank, self.dist.world):
            b = self.batch(self.eval_rows, ids, self.eval_samples)
            loss_sum += float(self.engine(input_ids=b.input_ids, labels=b.labels, **b.model_kwargs()))
            supervised += b.supervised
        self.model.train()
        loss_sum, supervised = dist_mod.sum_over_ranks(self.dist, [loss_sum, supervised], self.device)
        return loss_sum / max(supervised, 1)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, keep: int = 2) -> Path:
        """Every rank gathers (FSDP shards), rank 0 writes: full tensors, loadable on any world size."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter = dist_mod.full_trainable_state(self.model)
        optimizer = dist_mod.full_optimizer_state(self.model, self.optimizer)
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:07d}"
        if not self.dist.main:
            return final

        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".tmp-step-{self.step:07d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(self.model, state_dict=adapter).items()}
        save_file(state, staging / "adapter_model.safetensors")
        torch.save(optimizer, staging / "optimizer.pt")  # keyed by parameter name, full tensors
        torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
        meta = {"step": self.step, "ema": self.ema, "best_eval": self.best_eval, "bad_evals": self.bad_evals,
                "tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "total_steps": self.total_steps}
        (staging / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # atomic: a kill leaves either the old or the new checkpoint, never half of one
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _latest_checkpoint(self) -> Path:
        found = sorted((self.out / "checkpoints").glob("step-*"))
        if not found:
            raise TrainError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume")
        return found[-1]

    def _load_checkpoint(self) -> None:
        """Optimizer, scheduler and counters (the adapter loaded in ``_setup_model``). Every rank
        reads the checkpoint: the run directory must be visible to all of them (shared storage)."""
        ckpt = self.checkpoint
        optimizer = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
        if optimizer["param_groups"] and all(isinstance(i, int) for i in optimizer["param_groups"][0]["params"]):
            self.optimizer.load_state_dict(optimizer)  # a checkpoint from before name-keyed states (one process)
        else:
            dist_mod.load_optimizer_state(self.model, self.optimizer, optimizer)
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        meta = json.loads((ckpt / "state.json").read_text())
        self.step, self.ema, self.best_eval = meta["step"], meta["ema"], meta["best_eval"]
        self.bad_evals, self.tokens_seen, self.elapsed = meta["bad_evals"], meta["tokens_seen"], meta["elapsed"]

    # ---- outputs -------------------------------------------------------------------------

    def final_metrics(self, train_loss, eval_loss) -> dict:
        metrics = {"steps": self.step, "train_loss": train_loss, "eval_loss": eval_loss, "tokens": self.tokens_seen,
                   "elapsed_s": round(self.elapsed, 3), "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9)}
        if self.device.type == "cuda":
            metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
            if self.dist.enabled and self.peak_memory_per_rank:
                metrics["peak_gpu_memory_bytes_per_rank"] = self.peak_memory_per_rank
        if self.dist.enabled:
            metrics |= {"processes": self.dist.world, "strategy": self.strategy}
        return metrics

    def save_adapter(self, status: str) -> None:
        from loraforge.serve.adapters import warn_if_not_vllm_servable
        from loraforge.train.report import plot_loss, write_manifest

        state = dist_mod.full_trainable_state(self.model)  # every rank: FSDP gathers shards
        if not self.dist.main:
            return
        adapter = self.out / "adapter"
        self.model.save_pretrained(adapter, state_dict=state)  # plain PEFT format, whatever the world size
        self.tokenizer.save_pretrained(adapter)  # the chat template serving must use
        warn_if_not_vllm_servable(adapter)  # beyond one GPU, adapters are served by vLLM (README)
        write_manifest(self, status)
        plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")


def train(config: LoraforgeConfig, resume: bool = False, dry_run: bool = False, show_progress: bool = True, processes: int | None = None) -> TrainResult:
    """Run the recipe; under torchrun, in every process (``processes`` plans a dry run for N)."""
    run = TrainRun(config, resume=resume, show_progress=show_progress, processes=processes)
    findings = run.setup(dry_run=dry_run)
    if dry_run:
        metrics = {"data": run.data_stats(), "memory_estimate": run.memory_estimate, "strategy": run.strategy, "memory_plan": run.memory_plan.describe()}
        return TrainResult(run.out, 0, "dry_run", None, None, findings, metrics)
    result = run.train()
    dist_mod.shutdown(run.dist)  # after success only: a failed rank must not wait at a barrier
    return result


def _gpu_utilization(device: torch.device) -> float:
    """This GPU's utilization, 0-1 (NVML); -1 where NVML does not answer."""
    try:
        return torch.cuda.utilization(device) / 100
    except Exception:  # no NVML: reported as unknown
        return -1.0


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
