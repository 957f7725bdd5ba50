"""GPU smoke run of ``loraforge train``: LoRA (bf16) and QLoRA (nf4) for a few steps on
SmolLM2-135M and the Llama-3-8B architecture with random weights, reporting tokens/s and
peak GPU memory. Speed and memory do not depend on the weights' values.

Run (on a CUDA machine): ``python -m loraforge.bench.train_smoke --tokenizer DIR --out DIR``
where DIR holds the embedded default's tokenizer and config (``loraforge model`` prepares it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)


def build_random_model(arch: str, tokenizer_dir: Path, out: Path, device: str = "cuda") -> Path:
    """A bf16 model of ``arch`` (smollm2 | llama3-8b) with random weights and the embedded tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(tokenizer_dir) if arch == "smollm2" else LlamaConfig(**LLAMA3_8B)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def run_case(model_dir: Path | str, data: Path, out: Path, quantization: str | None, micro_batch: int, steps: int, seq: int) -> dict:
    import torch

    from loraforge.config import load_config
    from loraforge.train.recipe import train
    from loraforge.train.report import read_metrics, tokens_per_second

    torch.cuda.reset_peak_memory_stats()
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(overrides={
        "model.name": str(model_dir), "train.data": str(data), "train.out": str(out), "train.max_steps": steps,
        "train.micro_batch_size": micro_batch, "train.max_seq_length": seq, "train.eval_fraction": 0.0,
        "train.quantization": quantization, "train.lora.r": 32, "train.lora.alpha": 64, "train.checkpoint_every": 1000,
    })
    started = time.perf_counter()
    result = train(cfg, show_progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    timed = rows[1:] or rows  # step 1 includes kernel warm-up
    return {
        "quantization": quantization or "bf16", "steps": result.steps, "micro_batch": micro_batch, "seq": seq,
        "tokens_per_s": round(tokens_per_second(timed), 1), "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "wall_s": round(time.perf_counter() - started, 1),
        "accelerations": json.loads((out / "manifest.json").read_text())["accelerations"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loraforge-smoke"))
    parser.add_argument("--archs", default="smollm2,llama3-8b")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    import torch

    from loraforge.demo.data import write_demo_data

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.work / "data.jsonl"
    write_demo_data(data, n=1200)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for arch in args.archs.split(","):
        # "smollm2-real": the embedded default's real weights (converted from its GGUF there)
        model_dir = "smollm2-135m-instruct" if arch == "smollm2-real" else build_random_model(arch, args.tokenizer, args.work / arch)
        micro_batch = 2 if arch == "llama3-8b" else 8
        for quantization in (None, "nf4"):
            try:
                case = run_case(model_dir, data, args.work / f"run-{arch}-{quantization}", quantization, micro_batch, args.steps, 2048)
            except Exception as exc:  # record and go on to the next case
                case = {"quantization": quantization or "bf16", "error": repr(exc)[:2000]}
            case["arch"] = arch
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
            (args.out / "train_smoke.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
