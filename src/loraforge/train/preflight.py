"""Checks before every training run (and all ``--dry-run`` does): each a small named function.

A ``block`` finding stops the run with what to change; ``warn`` is shown and the run goes on.
Model facts come from a weightless (meta-device) copy of the architecture, so preflight takes
seconds even for an 8B model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraforge.config import LoraSection, TrainConfig

GiB = 1024**3


@dataclass
class Finding:
    level: str  # ok | warn | block
    check: str
    message: str
    fix: str = ""


def meta_model(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_target_modules(linear_names: set[str], lora: LoraSection) -> Finding:
    if lora.target_modules == "all-linear":
        return Finding("ok", "target_modules", f"all-linear: {', '.join(sorted(linear_names))}")
    missing = [m for m in lora.target_modules if m not in linear_names]
    if missing:
        return Finding(
            "block", "target_modules", f"not linear layers of this model: {', '.join(missing)}",
            f"use names from: {', '.join(sorted(linear_names))}, or train.lora.target_modules: all-linear",
        )
    return Finding("ok", "target_modules", ", ".join(lora.target_modules))


def check_alpha(lora: LoraSection) -> Finding:
    ratio = lora.alpha / (math.sqrt(lora.r) if lora.rslora else lora.r)
    scale = f"alpha / {'sqrt(r)' if lora.rslora else 'r'} = {ratio:g}"
    if 1 <= ratio <= 4:
        return Finding("ok", "alpha", scale)
    fix = "alpha is a scale: usual values give alpha / r between 1 and 4"
    if lora.r >= 64 and not lora.rslora:
        fix += "; at high ranks consider train.lora.rslora: true (scales by alpha / sqrt(r))"
    return Finding("warn", "alpha", f"{scale}, outside the usual 1-4: updates are {'damped' if ratio < 1 else 'amplified'}", fix)


def check_learning_rate(cfg: TrainConfig) -> Finding:
    high = 5e-4 if cfg.quantization else 1e-3
    if cfg.lr > high:
        return Finding(
            "warn", "learning_rate", f"lr {cfg.lr:g} is high for {'QLoRA' if cfg.quantization else 'LoRA'} (usual 1e-4 to {high:g})",
            "lower train.lr; 4-bit base weights amplify instability" if cfg.quantization else "lower train.lr",
        )
    if cfg.lr < 1e-6:
        return Finding("warn", "learning_rate", f"lr {cfg.lr:g} is so low the adapter will barely move", "raise train.lr to ~1e-4")
    return Finding("ok", "learning_rate", f"lr {cfg.lr:g}")


def check_quantization(cfg: TrainConfig, device: torch.device) -> Finding:
    if cfg.quantization is None:
        return Finding("ok", "quantization", "none (LoRA on full-precision base weights)")
    if device.type != "cuda":
        return Finding("block", "quantization", "QLoRA (nf4) needs a CUDA GPU and none is visible", "leave train.quantization unset on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # bitsandbytes raises many kinds of errors when its binary does not load
        return Finding("block", "quantization", f"bitsandbytes does not load: {exc}", "pip install 'bitsandbytes>=0.45' built for torch's CUDA; see `loraforge doctor`")
    return Finding("ok", "quantization", "nf4, double quantization, bf16 compute")


def check_data(stats: dict) -> Finding:
    if stats["samples"] == 0:
        return Finding("block", "data", "no training sample left (all rejected, or no supervised token after truncation)", "check the gate report and train.max_seq_length")
    message = (
        f"{stats['samples']} samples, tokens mean {stats['mean_tokens']:.0f} / p95 {stats['p95_tokens']} / max {stats['max_tokens']}, "
        f"{stats['supervised_tokens']:,} supervised tokens, {stats['rows']} rows, packing efficiency {stats['packing_efficiency']:.0%}"
    )
    if stats["truncated"]:
        return Finding("warn", "data", message + f"; {stats['truncated']} samples truncated to max_seq_length", "raise train.max_seq_length or gate with the same limit")
    return Finding("ok", "data", message)


def weight_bytes(module, cfg: TrainConfig, width: int) -> float:
    """Bytes of a module's base weights: linear layers in 4 bits + scales under nf4, the rest at ``width``."""
    params = sum(p.numel() for p in module.parameters())
    linear = sum(m.weight.numel() for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    return (params - linear) * width + (linear * 0.53 if cfg.quantization else linear * width)  # nf4: 4 bits + scales


def estimate_memory(
    model, cfg: TrainConfig, dtype: torch.dtype, seq_len: int, micro_batch: int, checkpointing: bool, fused_loss: bool = False, flat: bool = False
) -> dict[str, int]:
    """Bytes of weights, LoRA + gradients + AdamW state, activations and logits for one micro-batch
    (``fused_loss``: one chunk of logits at a time; ``flat``: padding-free, no attention mask)."""
    from loraforge.train.memory import layer_bytes

    c = model.config
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    width = dtype.itemsize
    weights = weight_bytes(model, cfg, width)
    per_layer_lora = 0
    targets = None if cfg.lora.target_modules == "all-linear" else set(cfg.lora.target_modules)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head") and (targets is None or name.rsplit(".", 1)[-1] in targets):
            per_layer_lora += cfg.lora.r * (m.in_features + m.out_features)
    # weights, gradients, AdamW m and v: fp32, or the model's dtype (train.adapter_dtype)
    lora_state = per_layer_lora * 4 * (width if cfg.adapter_dtype == "model" else 4)
    tokens = micro_batch * seq_len
    per_token = layer_bytes(c, width)  # the planner's numbers: all layers kept, or inputs + one recomputed
    activations = tokens * (layers * per_token.checkpointed + per_token.full) if checkpointing else tokens * layers * per_token.full
    if fused_loss:
        from loraforge.train.loss import chunk_size

        logits = chunk_size(vocab) * vocab * (4 + width) + tokens * h * width  # a chunk, and the hidden states' gradient
    else:
        logits = tokens * vocab * (width + 8)  # model dtype + fp32 copy for the loss + its gradient
    mask = 0 if flat else micro_batch * seq_len * seq_len
    return {"weights": int(weights), "lora_and_optimizer": int(lora_state), "activations": int(activations), "logits": int(logits), "attention_mask": int(mask)}


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def plan_memory(model, cfg: TrainConfig, dtype, device, seq_len: int, fused_loss: bool, flat: bool):
    """The memory planner's choice (``train.memory.plan``) for this model, data and device.

    With ``train.adapter_dtype`` null, adapters stay fp32 unless only the model's dtype fits the
    budget (every layer recomputed and offloaded, still over): then the plan takes the model's."""
    from loraforge.train import memory

    budget = int(cfg.memory_budget_gib * GiB) if cfg.memory_budget_gib else int(0.9 * available_memory(device))
    offload = cfg.offload_activations if device.type == "cuda" else False  # pinned memory and copies need CUDA

    def plan_for(adapter_dtype: str):
        planned = cfg.model_copy(update={"adapter_dtype": adapter_dtype})
        parts = estimate_memory(model, planned, dtype, seq_len, cfg.micro_batch_size, False, fused_loss, flat)
        fixed = {k: v for k, v in parts.items() if k != "activations"}
        per_token = memory.layer_bytes(model.config, dtype.itemsize, keep_attention=cfg.keep_attention and flat)
        chosen = memory.plan(fixed, per_token, model.config.num_hidden_layers, cfg.micro_batch_size * seq_len, budget, cfg.gradient_checkpointing, offload)
        chosen.adapter_dtype = adapter_dtype
        return chosen

    chosen = plan_for(cfg.adapter_dtype or "fp32")
    if cfg.adapter_dtype is None and chosen.total > budget and dtype.itemsize < 4:
        chosen = plan_for("model")
    return chosen


def check_memory(model, cfg: TrainConfig, dtype, device, seq_len: int, checkpointing: bool, parts: dict[str, int] | None = None) -> tuple[Finding, dict]:
    parts = parts or estimate_memory(model, cfg, dtype, seq_len, cfg.micro_batch_size, checkpointing)
    need, have = sum(parts.values()), available_memory(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU RAM"
    summary = f"~{need / GiB:.1f} GiB needed of {have / GiB:.1f} GiB free on {where} (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items()) + ")"
    if need <= 0.9 * have:
        return Finding("ok", "memory", summary), parts
    options = []
    for mb in (cfg.micro_batch_size // 2, cfg.micro_batch_size // 4, 1):
        if 1 <= mb < cfg.micro_batch_size and sum(estimate_memory(model, cfg, dtype, seq_len, mb, checkpointing).values()) <= 0.9 * have:
            options.append(f"train.micro_batch_size: {mb} (raise train.grad_accum to keep the batch)")
            break
    if not checkpointing and sum(estimate_memory(model, cfg, dtype, seq_len, cfg.micro_batch_size, True).values()) <= 0.9 * have:
        options.append("train.gradient_checkpointing: true")
    if cfg.quantization is None and device.type == "cuda":
        quantized = cfg.model_copy(update={"quantization": "nf4"})
        if sum(estimate_memory(model, quantized, dtype, seq_len, cfg.micro_batch_size, True).values()) <= 0.9 * have:
            options.append("train.quantization: nf4 with checkpointing (QLoRA)")
    fix = "; or ".join(options) or "a smaller model, shorter train.max_seq_length, or a larger GPU"
    return Finding("block", "memory", "does not fit: " + summary, fix), parts


def fsdp_memory(model, cfg: TrainConfig, dtype, parts: dict[str, int], world: int) -> dict[str, int]:
    """Per-GPU bytes under FSDP: base weights, LoRA and AdamW state divided over ``world``, plus two
    whole decoder layers (the one computing and the one prefetched); activations stay per GPU."""
    from loraforge.train.distributed import decoder_layers

    width = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    layer = max(weight_bytes(m, cfg, width) for m in decoder_layers(model))
    return parts | {"weights": int(parts["weights"] / world + 2 * layer), "lora_and_optimizer": int(parts["lora_and_optimizer"] / world)}


def plan_strategy(
    model, cfg: TrainConfig, dtype, device, seq_len: int, checkpointing: bool, world: int, local_world: int, parts: dict[str, int] | None = None
) -> tuple[Finding, Finding, str, dict]:
    """DDP or FSDP for ``world`` processes, from the memory estimate (``parts``: the memory plan's,
    else estimated here): (strategy finding, memory finding, strategy, per-GPU estimate). DDP when
    the whole model fits on each GPU (only LoRA gradients travel), else FSDP;
    ``train.distributed`` forces one."""
    ddp = parts or estimate_memory(model, cfg, dtype, seq_len, cfg.micro_batch_size, checkpointing)
    fsdp = fsdp_memory(model, cfg, dtype, ddp, world)
    have = available_memory(device) // (1 if device.type == "cuda" else local_world)  # CPU processes share the RAM
    budget = 0.9 * have
    need = {"ddp": sum(ddp.values()), "fsdp": sum(fsdp.values())}
    if cfg.quantization:  # each rank loads the whole 4-bit model on its GPU before sharding it
        need["fsdp"] = max(need["fsdp"], ddp["weights"])
    if cfg.distributed != "auto":
        strategy, why = cfg.distributed, f"set by train.distributed: {cfg.distributed}"
    elif need["ddp"] <= budget:
        strategy, why = "ddp", "the whole model fits on each GPU, so only LoRA gradients travel"
    else:
        strategy, why = "fsdp", f"the model does not fit on one GPU; base weights, LoRA and optimizer state are sharded over {world}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU RAM per process"
    unit = "GPU" if device.type == "cuda" else "process"
    batch = f"global batch {cfg.micro_batch_size} x {cfg.grad_accum} x {world} = {cfg.micro_batch_size * cfg.grad_accum * world} rows"
    numbers = f"per {unit} ~{need['ddp'] / GiB:.1f} GiB replicated (DDP) vs ~{need['fsdp'] / GiB:.1f} GiB sharded (FSDP), {have / GiB:.1f} GiB free on {where}"
    strategy_finding = Finding("ok", "strategy", f"{strategy.upper()} over {world} processes: {why} ({numbers}); {batch}")
    host = local_world * ddp["weights"]
    if strategy == "fsdp" and not cfg.quantization and device.type == "cuda" and host > 0.9 * available_memory(torch.device("cpu")):
        strategy_finding = Finding(
            "warn", "strategy", strategy_finding.message + f"; each process first loads the full-precision base in CPU memory: ~{host / GiB:.0f} GiB on this host",
            "train.quantization: nf4 (the 4-bit base loads straight to each GPU), or a host with more memory",
        )
    parts = ddp if strategy == "ddp" else fsdp
    summary = f"~{need[strategy] / GiB:.1f} GiB per {unit} ({strategy}) of {have / GiB:.1f} GiB free on {where} (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items()) + ")"
    if need[strategy] <= budget:
        return strategy_finding, Finding("ok", "memory", summary), strategy, parts
    fixes = []
    if strategy == "ddp" and need["fsdp"] <= budget:
        fixes.append("train.distributed: fsdp (or auto)")
    fixes += ["a smaller train.micro_batch_size (raise train.grad_accum to keep the batch)", "more GPUs"]
    if not checkpointing:
        fixes.append("train.gradient_checkpointing: true")
    if cfg.quantization is None and device.type == "cuda":
        fixes.append("train.quantization: nf4 (QLoRA)")
    return strategy_finding, Finding("block", "memory", "does not fit: " + summary, "; or ".join(fixes)), strategy, parts
