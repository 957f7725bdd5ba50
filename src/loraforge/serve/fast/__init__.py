"""The fast serving engine for Llama-family models: near the memory-bandwidth floor on a GPU.

Decoding is memory-bound: each step reads every weight once, whatever the batch, so tokens/s
come from (1) batching many requests into each step (continuous batching: requests join and
leave between steps), (2) not wasting the step on anything else (CUDA graphs remove ~1,000
kernel launches a step; sampling stays on the device; one host sync a step), and (3) serving
mixed adapters without splitting the batch (batched LoRA over stacked adapter weights).

Pieces, in the order a token meets them:

    engine.FastEngine     the ``submit`` contract of ``serve.engine.Engine``; the scheduler:
                          slots, chunked prefill, decode, delivery (module docstring: one step)
    model.FusedLlama      our Llama forward over the HF model's weights; the static KV cache
                          [layers, 2, slots, kv_heads, max_len, head_dim]; prefill and decode
    lora.AdapterBank      PEFT adapters stacked per module group; fused (LoRA A under the base
                          weight, a Triton expand), dense or gather application
    sampling.sample       greedy / temperature / top-p on the device, counter-based seeds
    graphs.DecodeGraphs   one CUDA graph per (batch bucket, length bucket)

``serve.engine=auto`` uses it for Llama models (``unsupported_reason`` says why not for
others), ``serve.engine=hf`` keeps the reference engine (transformers + PEFT).
"""

from loraforge.serve.fast.engine import FastEngine
from loraforge.serve.fast.lora import AdapterBank, read_peft_adapter
from loraforge.serve.fast.model import FusedLlama, unsupported_reason

__all__ = ["AdapterBank", "FastEngine", "FusedLlama", "read_peft_adapter", "unsupported_reason"]
