"""CUDA graphs of the decode step, one per (batch bucket, length bucket).

A decode step of an 8B model is ~1,000 small kernels; launched one by one from Python the
GPU waits on the CPU. Captured once as a CUDA graph, a step is one launch. The graph reads
the slot state, the KV cache and the adapter bank at fixed addresses (they are allocated
once), so replaying it needs no input copies; its logits land in a fixed output tensor.

Graphs are captured lazily, the first time a bucket is used (~two decode steps' time), and
share one memory pool (they never run at the same time). Reallocating the adapter bank
(an adapter with more slots or a higher rank than before) invalidates them: the key carries
the bank's version.
"""

from __future__ import annotations

import torch


class DecodeGraphs:
    def __init__(self, model):
        self.model = model
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @property
    def captured(self) -> int:
        return len(self.graphs)

    def decode(self, b: int, L: int) -> torch.Tensor:
        key = (b, L, self.model.lora.version)
        if key not in self.graphs:
            if any(k[2] != key[2] for k in self.graphs):
                self.graphs.clear()  # the adapter bank was reallocated
                self.pool = None  # the pool went with its graphs: capturing into it again is an error
            self.graphs[key] = self._capture(b, L)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, b: int, L: int):
        # Warm up on a side stream (as torch.cuda.graphs asks), then capture. Both only
        # recompute what the next replay computes: the K/V writes are idempotent.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model.decode(b, L)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.model.decode(b, L)
        self.pool = graph.pool()
        return graph, logits
