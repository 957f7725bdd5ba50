"""Where models come from: the embedded default, local Hugging Face directories, tiny test models."""

from loraforge.models.registry import (
    cache_root,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from loraforge.models.tiny import build_tiny_llama

__all__ = ["build_tiny_llama", "cache_root", "load_causal_lm", "load_tokenizer", "resolve_model"]
