"""``loraforge bench train``: LoRA training speed and memory, engines side by side (issue 7).

Engines, each in its own process (a clean peak-memory reading, and Unsloth's global patches
never touch the others), on the same GPU, model folder and data:

  hf-peft         transformers Trainer + PEFT, the usual padding collator (micro-batch padded to
                  its longest sample), gradient checkpointing; QLoRA via bitsandbytes and
                  prepare_model_for_kbit_training: what users run today
  loraforge       ``loraforge train``'s recipe with its defaults (the planner spends the GPU's
                  memory: the speed mode on a large GPU)
  loraforge-lean  the same under train.memory_budget_gib (default 18: Unsloth's footprint)
  loraforge-plain the same recipe with every speed lever off: the numerics reference
  unsloth         FastLanguageModel + get_peft_model(use_gradient_checkpointing="unsloth"),
                  its own fused loss, a plain AdamW loop over the same micro-batches
  unsloth-packed  the same fed loraforge's packed rows as one flat row with restarting
                  position_ids and no mask (Unsloth's packed input; its speed with packing)

Cases: ``dense`` (micro-batches of 2 x 4096 random tokens, every token supervised: kernels at
full occupancy) and ``alpaca`` (the shared Alpaca file rendered with the embedded chat template,
resampled to --samples, max 4096 tokens; loraforge packs it, hf-peft and unsloth pad pairs as
their defaults do). Reported: effective tokens/s (non-padding tokens over the timed steps'
wall time, after warm-up steps), peak GPU memory, on alpaca the epoch time those tokens/s give for the
whole resampled data, and the loss of the last step (same base weights and data order: the
numerics check; ``--arch smollm2-real``: on the embedded default's real weights). Every
engine: AdamW lr 2e-4 constant, no weight decay, no gradient clipping. A CPU run on the SmolLM2
architecture exercises the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("hf-peft", "loraforge", "loraforge-lean", "loraforge-plain", "unsloth", "unsloth-packed")
# loraforge-plain: the same recipe with every speed lever off (the numerics reference: same LoRA
# initialization and data order as loraforge, so their losses should agree step by step)
PLAIN = {"train.attention": "sdpa", "train.fused_loss": False, "train.fused_lora": False, "train.gradient_checkpointing": False, "train.accelerations": False}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- data ---------------------------------------------------------------------------------------


def dense_samples(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    from loraforge.train.data import TokenizedSample

    rows = torch.randint(vocab, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return [TokenizedSample(ids, list(ids)) for ids in rows]


def alpaca_samples(path: Path, tokenizer_dir: Path, n: int, max_len: int, seed: int = 0):
    """The Alpaca file's records as chat samples (the gate's reader), resampled to ``n``."""
    from loraforge.eval.samples import read_samples
    from loraforge.models import load_tokenizer
    from loraforge.train.data import ChatTokenizer, truncate

    tokenize = ChatTokenizer(load_tokenizer(str(tokenizer_dir)))
    pool = []
    for record in read_samples(path):
        sample = truncate(tokenize(record.messages), max_len)
        if sample is not None:
            pool.append(sample)
    rng = random.Random(seed)
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def padded_pairs(samples, micro_batch: int):
    """hf-peft / unsloth defaults: consecutive samples, padded to the longest of the micro-batch."""
    return [samples[i : i + micro_batch] for i in range(0, len(samples), micro_batch)]


# ---- engines (each runs in its own process) ----------------------------------------------------


def _timed(step_fn, batches, warmup: int, steps: int) -> dict:
    import torch

    times, tokens, losses = [], [], []
    for i, batch in enumerate(batches[: warmup + steps]):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, real = step_fn(batch)
        losses.append(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(real)
    return {"tokens_per_s": sum(tokens) / sum(times), "timed_steps": len(times), "last_loss": losses[-1], "losses": losses}


def _pad(batch, pad_id: int, device):
    import torch

    from loraforge.train.data import IGNORE

    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), IGNORE)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, s in enumerate(batch):
        n = len(s.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    return ids.to(device), labels.to(device), mask.to(device), int(mask.sum())


def run_hf_peft(model_dir, samples, quant, args) -> dict:
    """transformers Trainer + PEFT, padding collator, gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    kwargs = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "attn_implementation": "sdpa"}
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": 0} if torch.cuda.is_available() else None, **kwargs)
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    pad_id = model.config.pad_token_id or 0
    counted: list[int] = []

    def collator(features):
        ids, labels, mask, real = _pad(features, pad_id, "cpu")
        counted.append(real)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    batches = padded_pairs(samples, args.micro_batch)[: args.warmup + args.steps]
    training = TrainingArguments(
        output_dir=str(args.work / f"hf-trainer-{os.getpid()}"), per_device_train_batch_size=args.micro_batch, max_steps=len(batches),
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=torch.cuda.is_available(),
        learning_rate=2e-4, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
    )
    flat = [s for b in batches for s in b]
    trainer = Trainer(model=model, args=training, train_dataset=flat, data_collator=collator, callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(flat)  # the same order as the others
    start = time.perf_counter()
    trainer.train()
    marks.insert(0, start)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = range(args.warmup + 1, len(marks))
    seconds = sum(marks[i] - marks[i - 1] for i in timed)
    tokens = sum(counted[i - 1] for i in timed)
    return {"tokens_per_s": tokens / seconds, "timed_steps": len(timed), "last_loss": losses[-1] if losses else None, "losses": losses}


def run_loraforge(model_dir, samples, quant, args, budget_gib: float | None, plain: bool = False) -> dict:
    """``loraforge train``'s recipe on these samples (its data step replaced by them)."""
    import torch

    from loraforge.config import load_config
    from loraforge.train.recipe import TrainRun
    from loraforge.train.report import read_metrics, tokens_per_second

    import shutil

    if args.profile and not torch.cuda.is_available():
        raise SystemExit("--profile reads the GPU's kernel times: it needs CUDA")
    out = args.work / f"run-{args.engine}-{args.case}-{args.quant}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    steps = args.warmup + args.steps
    overrides = {
        "model.name": str(model_dir), "train.out": str(out), "train.max_steps": steps, "train.micro_batch_size": args.micro_batch,
        "train.max_seq_length": args.max_seq_length, "train.eval_fraction": 0.0, "train.quantization": "nf4" if quant else None,
        "train.lora.r": 32, "train.lora.alpha": 64, "train.checkpoint_every": 100000, "train.lr": 2e-4, "train.warmup_ratio": 0.0,
        "train.scheduler": "constant", "train.max_grad_norm": None, "train.weight_decay": 0.0,
    }
    if budget_gib:
        overrides["train.memory_budget_gib"] = budget_gib
    overrides.update(dict(kv.split("=", 1) for kv in args.loraforge_set))
    if plain:
        overrides.update(PLAIN)

    class BenchRun(TrainRun):
        def _setup_data(self):
            self.data_file, self.truncated = args.work / "bench-data", 0
            self.use_samples(samples, [])

        def _epoch_order(self, epoch: int) -> list[int]:
            if len(getattr(self, "_in_order", ())) != len(self.train_rows):  # made once, read every step
                self._in_order = list(range(len(self.train_rows)))
            return self._in_order  # rows in the data's order, as the other engines see it

        def save_checkpoint(self, keep: int = 2):
            return None  # not part of the measurement

        def save_adapter(self, status: str) -> None:
            return None

        def _launch_step(self, step):
            if not (args.profile and step == args.warmup - 1):
                return super()._launch_step(step)
            # the last warm-up step (not timed): where the GPU's time goes (``profiled`` waits for
            # the GPU before and after, so no other step's work is in it)
            with profiled(args.out / f"profile-{args.engine}-{args.case}-{args.quant}.txt"):
                return super()._launch_step(step)

    run = BenchRun(load_config(overrides=overrides), show_progress=False)
    run.setup()
    plan = run.memory_plan.describe()
    run.train()
    rows = read_metrics(out / "metrics.jsonl")
    timed = rows[args.warmup :]
    return {
        "tokens_per_s": tokens_per_second(timed), "timed_steps": len(timed), "last_loss": rows[-1]["loss"],
        "losses": [r["loss"] for r in rows], "step_tokens_per_s": [round(r["tokens_per_s"]) for r in rows], "plan": plan, "accelerations": run.accelerations,
        "layout": "flat (varlen)" if run.flat else "padded rows", "fused_loss": run.fused_loss, "packing_efficiency": run.data_stats()["packing_efficiency"],
    }


# kernel name fragments -> what they are (the first that matches names the kernel's category)
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")),
    ("copy / cast", ("copy", "memcpy", "memset", "cast", "convert", "cat", "fill")),
    ("elementwise / reduce", ("at::native", "elementwise", "reduce", "foreach")),  # PyTorch's own kernels
    ("triton (liger, loss)", ("triton", "_kernel")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


class profiled:
    """Profile the block on the GPU; write the kernel time by kind and the top kernels to ``path``,
    and the timeline next to it (``.trace.json.gz``, for chrome://tracing or Perfetto)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.prof.__enter__()

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(*exc)
        kernels = [e for e in self.prof.key_averages() if e.device_type.name == "CUDA"]
        time_of = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)  # noqa: E731
        total = sum(time_of(e) for e in kernels) or 1
        kinds: dict[str, float] = {}
        for e in kernels:
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0) + time_of(e)
        lines = [f"profiled step: wall {wall * 1e3:.1f} ms, GPU kernels {total / 1e3:.1f} ms"]
        lines += [f"  {kind:24} {us / 1e3:9.1f} ms  {100 * us / total:5.1f}%" for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])]
        lines.append("top kernels:")
        for e in sorted(kernels, key=time_of, reverse=True)[:40]:
            lines.append(f"  {time_of(e) / 1e3:9.2f} ms {e.count:6d}x  {kernel_kind(e.key):22} {e.key[:150]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")
        self.prof.export_chrome_trace(str(self.path.with_suffix(".trace.json.gz")))  # the timeline: gaps, streams
        return False


def packed_flat_batches(samples, micro_batch: int, max_len: int):
    """loraforge's packing (rows of <= max_len tokens), ``micro_batch`` rows to a flat batch."""
    from loraforge.train.data import pack

    rows = pack([len(s.input_ids) for s in samples], max_len)
    return [[samples[i] for row in rows[k : k + micro_batch] for i in row] for k in range(0, len(rows), micro_batch)]


def run_unsloth(model_dir, samples, quant, args, packed: bool = False) -> dict:
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=args.max_seq_length, dtype=torch.bfloat16, load_in_4bit=quant, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0, bias="none", target_modules=TARGETS, use_gradient_checkpointing="unsloth", random_state=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0, fused=True)
    pad_id = model.config.pad_token_id or 0

    def step(batch):
        if packed:  # one flat row, positions restarting per sample, no mask (Unsloth's packed input)
            from loraforge.train.batch import collate_flat

            flat = collate_flat([batch]).to("cuda")
            loss = model(input_ids=flat.input_ids, position_ids=flat.position_ids, labels=flat.labels).loss
            real = flat.real_tokens
        else:
            ids, labels, mask, real = _pad(batch, pad_id, "cuda")
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), real

    batches = packed_flat_batches(samples, args.micro_batch, args.max_seq_length) if packed else padded_pairs(samples, args.micro_batch)
    return _timed(step, batches, args.warmup, args.steps)


def run_one(args) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    samples = all_samples(args)
    quant = args.quant == "nf4"
    started = time.perf_counter()
    if args.engine == "hf-peft":
        result = run_hf_peft(args.model_dir, samples, quant, args)
    elif args.engine == "loraforge":
        result = run_loraforge(args.model_dir, samples, quant, args, None)
    elif args.engine == "loraforge-lean":
        result = run_loraforge(args.model_dir, samples, quant, args, float(args.lean_budget))
    elif args.engine == "loraforge-plain":
        result = run_loraforge(args.model_dir, samples, quant, args, None, plain=True)
    elif args.engine == "unsloth":
        result = run_unsloth(args.model_dir, samples, quant, args)
    elif args.engine == "unsloth-packed":
        result = run_unsloth(args.model_dir, samples, quant, args, packed=True)
    else:
        raise SystemExit(f"unknown engine {args.engine}: one of {', '.join(ENGINES)}")
    result |= {
        "engine": args.engine, "case": args.case, "quant": args.quant, "arch": args.arch,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.case == "alpaca":  # an epoch of the resampled data at the measured rate
        result["epoch_tokens"] = sum(len(s.input_ids) for s in samples)
        result["epoch_s"] = result["epoch_tokens"] / result["tokens_per_s"]
    return result


def all_samples(args):
    """The case's samples (a child process measures one engine on one case: built once there)."""
    if args.case == "dense":
        return dense_samples((args.warmup + args.steps) * args.micro_batch, args.max_seq_length, args.data_vocab)
    return alpaca_samples(args.alpaca, args.tokenizer, args.samples, args.max_seq_length)


# ---- the orchestrator ------------------------------------------------------------------------


def prepare_model(arch: str, tokenizer_dir: Path, work: Path) -> Path:
    import torch

    from loraforge.bench.train_smoke import build_random_model

    if arch == "smollm2-real":
        from loraforge.models import resolve_model

        return resolve_model("smollm2-135m-instruct")
    out = work / f"model-{arch}"
    if not (out / "config.json").is_file():
        build_random_model(arch, tokenizer_dir, out, device="cuda" if torch.cuda.is_available() else "cpu")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="loraforge bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama3-8b", choices=["llama3-8b", "smollm2", "smollm2-real"], help="smollm2-real: the embedded default with its real weights (the numerics check)")
    parser.add_argument("--engines", default="hf-peft,loraforge,loraforge-lean,unsloth")
    parser.add_argument("--cases", default="dense,alpaca")
    parser.add_argument("--quants", default="bf16,nf4")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--lean-budget", default="18", help="GiB for loraforge-lean, or 'match': the peak memory the fastest Unsloth engine measured in this run, same case and weights (list it before loraforge-lean)")
    parser.add_argument("--alpaca", type=Path, default=Path("../shared/data/alpaca_cleaned_1000.json"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="the embedded default's tokenizer dir (default: the embedded model)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loraforge-bench-train"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/train"))
    parser.add_argument("--child-timeout", type=float, default=400, help="seconds one engine run may take")
    parser.add_argument("--profile", action="store_true", help="profile the loraforge engines' last warm-up step (CUDA): kernel time by kind and the timeline in --out; the steps timed after it run slower (seen: 9.4k instead of 10.3-11.1k tokens/s in the lean mode), so take speeds from runs without it")
    parser.add_argument("--loraforge-set", action="append", default=[], help="KEY=VALUE override for the loraforge engines (repeatable)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--quant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-vocab", type=int, default=49152, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        from loraforge.models import resolve_model

        args.tokenizer = resolve_model("smollm2-135m-instruct")
    if args.engine:  # a child: one measurement, one JSON line
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return []

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args.arch, args.tokenizer, args.work)
    results = []
    for case in args.cases.split(","):
        for quant in args.quants.split(","):
            for engine in args.engines.split(","):
                child = [sys.executable, "-m", "loraforge.bench.train_speed", *(argv if argv is not None else sys.argv[1:]),
                         "--engine", engine, "--case", case, "--quant", quant, "--model-dir", str(model_dir), "--tokenizer", str(args.tokenizer)]
                if engine == "loraforge-lean":
                    child += ["--lean-budget", str(lean_budget(args.lean_budget, results, case, quant))]
                started = time.perf_counter()
                try:
                    proc = subprocess.run(child, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}, timeout=args.child_timeout)
                except subprocess.TimeoutExpired as exc:
                    proc = subprocess.CompletedProcess(child, -9, exc.stdout or "", f"timed out after {args.child_timeout} s")
                    proc.stdout = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
                found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if found:
                    result = json.loads(found[-1])
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
                    result = {"engine": engine, "case": case, "quant": quant, "arch": args.arch, "error": " | ".join(tail)}
                result["process_s"] = round(time.perf_counter() - started, 1)
                results.append(result)
                print(_line(result), flush=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def lean_budget(setting: str, results: list[dict], case: str, quant: str) -> float:
    """GiB for loraforge-lean: a number, or 'match': the fastest Unsloth engine's measured peak here."""
    if setting != "match":
        return float(setting)
    peers = [r for r in results if r["engine"].startswith("unsloth") and r["case"] == case and r["quant"] == quant and "error" not in r]
    if not peers:
        raise SystemExit(f"--lean-budget match: no Unsloth result for {case} {quant} yet; list unsloth (or unsloth-packed) before loraforge-lean in --engines")
    return max(peers, key=lambda r: r["tokens_per_s"])["peak_gpu_memory_gib"]


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:7} {r['quant']:5} {r['engine']:15} FAILED: {r['error'][-400:]}"
    mem = f"{r['peak_gpu_memory_gib']:.1f} GiB" if r.get("peak_gpu_memory_gib") is not None else "-"
    epoch = f"epoch {r['epoch_s'] / 60:6.1f} min" if "epoch_s" in r else ""
    return f"{r['case']:7} {r['quant']:5} {r['engine']:15} {r['tokens_per_s']:10,.0f} tok/s  {mem:>10}  {epoch}  loss {r['last_loss']:.4f}  {r.get('plan', '')}"


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="loraforge bench train")
    for col in ("case", "quant", "engine", "tokens/s", "vs hf-peft", "vs unsloth", "peak GiB", "epoch min", "last loss"):
        table.add_column(col, justify="right" if col not in ("case", "quant", "engine") else "left")
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            table.add_row(r["case"], r["quant"], r["engine"], "failed", "", "", "", "", "")
            continue
        peers = {p["engine"]: p["tokens_per_s"] for p in ok if p["case"] == r["case"] and p["quant"] == r["quant"]}
        ratio = lambda name: f"{r['tokens_per_s'] / peers[name]:.2f}x" if name in peers else ""  # noqa: E731
        mem = f"{r['peak_gpu_memory_gib']:.1f}" if r.get("peak_gpu_memory_gib") is not None else "-"
        epoch = f"{r['epoch_s'] / 60:.1f}" if "epoch_s" in r else "-"
        table.add_row(r["case"], r["quant"], r["engine"], f"{r['tokens_per_s']:,.0f}", ratio("hf-peft"), ratio("unsloth"), mem, epoch, f"{r['last_loss']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
