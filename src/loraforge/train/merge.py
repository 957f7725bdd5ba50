"""``loraforge merge``: the adapter folded into full weights that plain transformers loads.

Always merged into bf16 or fp32 base weights, never into 4-bit ones (a QLoRA run's base is
reloaded in full precision first): merging into quantized weights would round the update away.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraforge.errors import TrainError


def adapter_dir(run_or_adapter: Path) -> Path:
    path = Path(run_or_adapter)
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise TrainError(f"{path} holds no adapter (adapter_config.json): pass a run directory or its adapter/ folder")


def merge(run_dir: Path, out: Path, dtype: str = "auto") -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.models import resolve_model

    adapter = adapter_dir(run_dir)
    manifest = Path(run_dir) / "manifest.json"
    base_name = json.loads(manifest.read_text())["model"] if manifest.is_file() else json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(resolve_model(base_name), dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    return out
