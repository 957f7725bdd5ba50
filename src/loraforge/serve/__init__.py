"""Serving: the base model and LoRA adapters behind an OpenAI-compatible HTTP API.

Pieces, each small: ``protocol`` (pydantic models of the OpenAI wire format), ``adapters``
(loading, confinement to the adapter root, chat templates, vLLM's limits), ``engine`` (what
every engine shares, and the reference engine over transformers + PEFT), ``fast`` (the Llama
engine: continuous batching, static KV cache, batched LoRA, CUDA graphs), ``metrics``
(Prometheus), ``app`` (FastAPI routes: HTTP and streaming only).
"""
