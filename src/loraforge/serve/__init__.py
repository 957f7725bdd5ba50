"""Serving: the base model and LoRA adapters behind an OpenAI-compatible HTTP API.

Pieces, each small: ``protocol`` (pydantic models of the OpenAI wire format), ``adapters``
(loading, confinement to the adapter root, chat templates), ``engine`` (a batching generation
loop in its own thread), ``metrics`` (Prometheus), ``app`` (FastAPI routes: HTTP and
streaming only).
"""
