"""Training on several GPUs: tokens/s on 1 GPU vs N GPUs (DDP) for the Llama-3-8B shape in
bf16, and a Llama-3-70B-shaped QLoRA run sharded with FSDP, with peak memory per GPU.

Random weights, built in each process straight on its GPU (speed and memory do not depend
on the weights' values; 70B in bf16 would not fit one GPU, so the 4-bit base is built one
decoder layer at a time: a random bf16 layer is drawn and quantized to NF4, bf16 containers,
before the next). Nothing is written to disk but the run directories. The recipe is the one
``loraforge train`` runs; only the base model's loading is replaced (``RandomBaseRun``).
The tokenizer is the tiny in-process BPE one unless ``--tokenizer DIR`` names another: speed
per token does not depend on it.

Run on a machine with N >= 2 GPUs (the H200 image lacks pydantic and bitsandbytes: carry their
wheels, as ``scripts/gpu_train_distributed_bench.sh`` does)::

    loraforge bench train-distributed --gpus 2 --out bench-out/train-distributed
    # or: python -m loraforge.bench.train_distributed --gpus 2 --out DIR [--cases 8b,70b]

It prints one JSON line per case and writes ``DIR/train_distributed.json``: tokens/s (after
the first quarter of the steps, which warms kernels and the allocator up; every step's too), peak GPU memory per rank, the strategy the preflight chose, and
the speedup of N GPUs over 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loraforge.bench.train_smoke import LLAMA3_8B

SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "llama3-70b": dict(
        vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    ),
}

WORKER = ["-m", "loraforge.bench.train_distributed"]  # what each process of a case runs

# name -> (shape, quantization, processes: "1" or "N", train.distributed, micro-batch)
CASES = {
    "8b": [("llama3-8b", None, "1", "auto", 2), ("llama3-8b", None, "N", "auto", 2)],
    "70b": [("llama3-70b", "nf4", "N", "fsdp", 1)],
}


def model_dir(shape: str, work: Path, tokenizer_dir: Path | None) -> Path:
    """A directory with the shape's config.json and a tokenizer, no weights (built per process)."""
    from transformers import AutoTokenizer, LlamaConfig

    out = work / f"{shape}-config"
    if (out / "config.json").is_file():
        return out
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from loraforge.models.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_base(model_dir: Path, device, quantized: bool):
    """A random-weight model of ``model_dir``'s config on ``device``: bf16, or with every decoder
    linear layer in NF4 (bitsandbytes, bf16 storage for FSDP), built layer by layer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)  # the same weights in every process
    if not quantized:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    import bitsandbytes as bnb

    layers = config.num_hidden_layers
    config.num_hidden_layers = 0  # embeddings, final norm, LM head and rotary table, in bf16 on the GPU
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    config.num_hidden_layers = model.config.num_hidden_layers = layers
    layer_class = getattr(sys.modules[type(model).__module__], next(iter(model._no_split_modules)))  # LlamaDecoderLayer
    for index in range(layers):
        with torch.device("meta"):
            layer = layer_class(config, layer_idx=index)
        for name, linear in list(layer.named_modules()):
            if isinstance(linear, torch.nn.Linear):
                q = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.bfloat16,
                    compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16, device="meta",
                )
                weight = torch.randn(linear.out_features, linear.in_features, device=device, dtype=torch.bfloat16) * 0.02
                q.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16, module=q
                ).to(device)  # quantized here; the bf16 draw is freed
                if q.bias is not None:
                    q.bias = torch.nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=torch.bfloat16))
                layer.set_submodule(name, q)
        for name, p in list(layer.named_parameters()):
            if p.is_meta:  # norms
                module, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(module), leaf, torch.nn.Parameter(torch.ones(p.shape, device=device, dtype=torch.bfloat16)))
        model.model.layers.append(layer)
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; PEFT reads it
    return model


def _run_class():
    from loraforge.train.recipe import TrainRun

    class RandomBaseRun(TrainRun):
        """The recipe, with a random base built in place instead of read from disk."""

        def _load_base(self):
            return random_base(self.model_dir, self.device, self.cfg.quantization == "nf4")

    return RandomBaseRun


def worker(args) -> None:
    """One process of a case (under torchrun for N GPUs): train, then rank 0 writes the result."""
    import torch

    from loraforge.config import load_config
    from loraforge.train import distributed

    cfg = load_config(overrides={
        "model.name": str(args.model_dir), "train.data": str(args.data), "train.out": str(args.run_dir), "train.max_steps": args.steps,
        "train.micro_batch_size": args.micro_batch, "train.max_seq_length": args.seq, "train.eval_fraction": 0.0,
        "train.quantization": args.quantization, "train.lora.r": 32, "train.lora.alpha": 64, "train.checkpoint_every": 10_000,
        "train.distributed": args.distributed, "train.gradient_checkpointing": True,
    })
    started = time.perf_counter()
    run = _run_class()(cfg, show_progress=False)
    from loraforge.train.report import read_metrics, tokens_per_second

    findings = run.setup()
    setup_s = time.perf_counter() - started
    result = run.train()
    if run.dist.main:
        rows = read_metrics(args.run_dir / "metrics.jsonl")
        timed = rows[max(1, len(rows) // 4):] or rows  # the first quarter warms up (kernels, allocator)
        rate = tokens_per_second(timed)
        peaks = rows[-1].get("gpu_memory_allocated_bytes_per_rank") or [rows[-1].get("gpu_memory_allocated_bytes", 0)]
        strategy = [f.message for f in findings if f.check == "strategy"]
        (args.run_dir / "result.json").write_text(json.dumps({
            "processes": run.dist.world, "strategy": run.strategy, "steps": result.steps, "micro_batch_per_gpu": args.micro_batch, "seq": args.seq,
            "tokens_per_s": round(rate, 1), "tokens_per_s_per_gpu": round(rate / run.dist.world, 1),
            "peak_gpu_memory_gib_per_rank": [round(p / 2**30, 2) for p in peaks], "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
            "tokens_per_s_by_step": [round(r["tokens_per_s"]) for r in rows],
            "setup_s": round(setup_s, 1), "gpu": torch.cuda.get_device_name(), "preflight_strategy": strategy[0] if strategy else None,
        }))
    distributed.shutdown(run.dist)


def run_case(shape, quantization, processes, strategy, micro_batch, args) -> dict:
    work = args.work
    run_dir = work / f"run-{shape}-{quantization or 'bf16'}-{processes}gpu"
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    worker_args = [*WORKER, "--worker", "--model-dir", str(model_dir(shape, work, args.tokenizer)),
                   "--data", str(work / "data.jsonl"), "--run-dir", str(run_dir), "--steps", str(args.steps), "--seq", str(args.seq),
                   "--micro-batch", str(micro_batch), "--distributed", strategy] + (["--quantization", quantization] if quantization else [])
    command = [sys.executable, *worker_args] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *worker_args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    case = {"case": f"{shape} {quantization or 'bf16'} LoRA on {processes} GPU(s)", "wall_s": round(time.perf_counter() - started, 1)}
    if done.returncode != 0 or not (run_dir / "result.json").is_file():
        return case | {"error": (done.stdout + done.stderr)[-3000:]}
    return case | json.loads((run_dir / "result.json").read_text())


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU cases")
    parser.add_argument("--out", type=Path, default=Path("bench-out/train-distributed"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/loraforge-train-distributed"))
    parser.add_argument("--cases", default="8b,70b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tokenizer", type=Path, default=None)
    # one process of one case (what run_case starts)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--distributed", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    return bench(args)


def bench(args) -> dict:
    import torch

    from loraforge.demo.data import write_demo_data

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    write_demo_data(args.work / "data.jsonl", n=2400)  # gated in-process by each run
    results = {"gpus": args.gpus, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__, "cases": []}
    for name in args.cases.split(","):
        for shape, quantization, processes, strategy, micro_batch in CASES[name]:
            case = run_case(shape, quantization, 1 if processes == "1" else args.gpus, strategy, micro_batch, args)
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
            (args.out / "train_distributed.json").write_text(json.dumps(results, indent=2))
    by_processes = {c.get("processes"): c for c in results["cases"] if c["case"].startswith("llama3-8b") and "tokens_per_s" in c}
    if 1 in by_processes and args.gpus in by_processes:
        results["speedup_8b"] = round(by_processes[args.gpus]["tokens_per_s"] / by_processes[1]["tokens_per_s"], 3)
        print(json.dumps({"speedup_8b": results["speedup_8b"], "gpus": args.gpus}), flush=True)
    (args.out / "train_distributed.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
