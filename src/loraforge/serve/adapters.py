"""Adapters on disk: where they may come from, what they must contain, which template they use."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import AdapterError

log = logging.getLogger("loraforge.serve")

# What vLLM's LoRA serving accepts (its --max-lora-rank choices; its Llama LoRA modules,
# q/k/v and gate/up packed into one matmul each). Beyond one GPU, adapters go to vLLM
# (README: "Beyond one GPU"), so training and serving check them against these.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LLAMA_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def vllm_problems(adapter_config: dict) -> list[str]:
    """Why vLLM would refuse to serve this PEFT adapter config on a Llama (empty: it would not)."""
    problems = []
    ranks = {adapter_config.get("r", 8), *(adapter_config.get("rank_pattern") or {}).values()}
    if not ranks <= set(VLLM_LORA_RANKS):
        problems.append(f"rank {sorted(ranks)}: vLLM serves LoRA ranks {', '.join(map(str, VLLM_LORA_RANKS))}")
    targets = adapter_config.get("target_modules") or []
    targets = {targets} if isinstance(targets, str) else set(targets)
    if targets - VLLM_LLAMA_TARGETS and targets != {"all-linear"}:
        problems.append(f"target modules {sorted(targets - VLLM_LLAMA_TARGETS)}: vLLM's Llama LoRA covers {', '.join(sorted(VLLM_LLAMA_TARGETS))}")
    if adapter_config.get("use_dora"):
        problems.append("DoRA: vLLM serves plain LoRA only")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter_config['modules_to_save']}: vLLM loads LoRA weights only")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("LoRA biases: vLLM does not load them")
    return problems


def warn_if_not_vllm_servable(adapter_dir: Path | str, name: str | None = None) -> list[str]:
    """Log a warning per vLLM limit the adapter in ``adapter_dir`` breaks; returns them."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        return []
    problems = vllm_problems(json.loads(config_path.read_text()))
    for problem in problems:
        log.warning("adapter %s will not serve on vLLM: %s (merge it with `loraforge merge` to serve it there)", name or adapter_dir, problem)
    return problems


@dataclass
class AdapterInfo:
    name: str
    path: Path
    tokenizer: object  # the adapter's own tokenizer and chat template (the one it was trained with)
    template_matches_base: bool


def adapter_path(source: Path | str) -> Path:
    """A run directory or an adapter directory -> the directory with adapter_config.json."""
    path = Path(source)
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / "adapter_model.safetensors").is_file():
                raise AdapterError(f"{candidate}: no adapter_model.safetensors; loraforge loads safetensors only, never pickles (.bin)")
            return candidate
    raise AdapterError(f"{path}: no adapter here (adapter_config.json); pass a run directory or its adapter/ folder")


def confined(root: Path, requested: str) -> Path:
    """``requested`` resolved under ``root``; refuses absolute paths, '..' and symlinks that escape."""
    root = root.resolve()
    if Path(requested).is_absolute():
        raise AdapterError("adapter path must be relative to the adapter root")
    target = (root / requested).resolve()  # follows symlinks: an escaping link resolves outside root
    if target != root and root not in target.parents:
        raise AdapterError("adapter path escapes the adapter root")
    return target


def load_adapter_info(name: str, source: Path | str, base_tokenizer) -> AdapterInfo:
    from transformers import AutoTokenizer

    path = adapter_path(source)
    warn_if_not_vllm_servable(path, name)
    tokenizer = base_tokenizer
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    matches = tokenizer.chat_template == base_tokenizer.chat_template
    if not matches:
        log.warning("adapter %s: its chat template differs from the base model's; its requests use its own", name)
    if tokenizer.chat_template is None:
        tokenizer = base_tokenizer
    return AdapterInfo(name, path, tokenizer, matches)
