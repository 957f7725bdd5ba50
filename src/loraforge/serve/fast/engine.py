"""``FastEngine``: continuous batching over ``FusedLlama``, with the ``submit`` contract of ``Engine``.

One engine step, on the engine thread, while holding ``lock``:

    admit       waiting requests take free slots (lowest first), up to ``max_batch_size``
    prefill     one chunk of at most ``prefill_chunk`` prompt tokens, from the requests in
                prefill in arrival order (a long prompt spans several steps; short ones share
                a chunk); a request whose prompt is complete samples its first token on the
                device and joins the decode rows at once
    decode      one token for every decoding row (a CUDA graph per bucket on GPUs), sampled
                on the device; the slot state advances on the device; the step's tokens start
                copying to pinned host memory (asynchronously)
    deliver     the PREVIOUS step's tokens, now that this step is queued on the GPU: one wait
                for that copy (the step's one sync), then per request: text, stop strings,
                EOS, max_tokens, cancellation (``EngineBase._advance``); finished requests
                free their slots, and the next step can admit new ones

So requests join and leave between any two steps, and a request never waits behind more
than one prefill chunk of another one (TTFT at load is bounded by the chunk, not by the
longest prompt). The host's per-request work (detokenizing 64 streams takes milliseconds)
overlaps the GPU's next step instead of idling it; the price is that a request which
finished is only known one step later, so its row computes one token that is thrown away.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass

import torch

from loraforge.serve.engine import EngineBase, GenRequest, RequestTooLong
from loraforge.serve.fast.graphs import DecodeGraphs
from loraforge.serve.fast.lora import read_peft_adapter
from loraforge.serve.fast.model import FusedLlama, to_device
from loraforge.serve.fast.sampling import GREEDY_BELOW, sample

log = logging.getLogger("loraforge.serve")


@dataclass(eq=False)
class _Sequence:
    request: GenRequest
    slot: int
    adapter: int  # adapter slot in the bank, 0 = base
    seed: int
    prefilled: int = 0  # prompt tokens already in the cache
    length: int = 0  # tokens in the cache once decoding (counted when a step is launched)
    released: bool = False


@dataclass
class _Launched:
    """A step queued on the device whose tokens the host has not read yet."""

    joined: list[_Sequence]  # first tokens, in this order
    rows: list[_Sequence]  # decode rows: token at index len(joined) + slot
    tokens: torch.Tensor  # on the host (pinned on CUDA), filled once ``ready`` has happened
    ready: object  # torch.cuda.Event, or None on the CPU


def _bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= n (at least ``floor``), at most ``cap``."""
    return min(cap, max(floor, 1 << (n - 1).bit_length()))


class FastEngine(EngineBase):
    """The Llama serving engine (design in ``loraforge.serve.fast``).

    ``max_batch_size`` slots of ``max_seq_len`` tokens each (prompt + answer) in a static KV
    cache; ``prefill_chunk`` prompt tokens per step; ``cuda_graphs`` on CUDA only; ``lora_mode``
    how batched LoRA is applied (``fused``, ``dense``, ``gather``: ``lora``'s docstring).
    """

    def __init__(self, model, tokenizer, device, max_batch_size: int, max_queue: int, metrics=None,
                 max_seq_len: int | None = None, prefill_chunk: int = 512, cuda_graphs: bool = True, lora_mode: str = "fused"):
        super().__init__(tokenizer, max_queue, metrics)
        self.model = model
        self.device = torch.device(device)
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_len = min(max_seq_len or 4096, limit)
        cache_len = -(-(self.max_len + 1) // 16) * 16  # + a scratch position, rounded for kernels
        self.runner = FusedLlama(model, max_batch_size, cache_len, lora_mode)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.graphs = DecodeGraphs(self.runner) if (cuda_graphs and self.device.type == "cuda") else None
        self.free_slots = list(range(max_batch_size))  # a heap: lowest first keeps decode batches dense
        self.prefilling: deque[_Sequence] = deque()
        self.running: dict[int, _Sequence] = {}  # slot -> sequence
        self.pending: _Launched | None = None
        self._wake = threading.Event()
        log.info("fast engine: %d slots x %d tokens, KV cache %.2f GiB, CUDA graphs %s",
                 max_batch_size, self.max_len, self.runner.kv_cache_bytes / 2**30, "on" if self.graphs is not None else "off")

    # ---- the submit contract ---------------------------------------------------------------

    def submit(self, request: GenRequest) -> None:
        needed = len(request.prompt_ids) + request.max_tokens
        if needed > self.max_len:
            raise RequestTooLong(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) = {needed} tokens, "
                f"over this server's serve.max_seq_len {self.max_len}"
            )
        super().submit(request)
        self._wake.set()

    def add_adapter(self, name: str, path) -> None:
        weights = read_peft_adapter(path)  # disk and checks outside the lock
        with self.lock:
            self.runner.lora.add(name, weights)

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            slot = self.runner.lora.slots[name]
            for seq in [*self.prefilling, *self.running.values()]:
                if seq.adapter == slot:
                    self._fail(seq, f"adapter {name} was unloaded")
            self.runner.lora.remove(name)

    def run_batch(self, batch: list[GenRequest]) -> None:
        """Generate ``batch`` to the end on the calling thread (warm-up, tests)."""
        with self.lock:
            for r in batch:
                self.waiting.put(r)
            while any(r.finish_reason is None for r in batch):
                self.step()

    # ---- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            if not (self.prefilling or self.running or self.pending) and self.waiting.empty():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            with self.lock:
                try:
                    self.step()
                except Exception as exc:  # a failed step fails its requests, never the engine
                    log.exception("generation failed")
                    self.pending = None
                    for seq in [*self.prefilling, *self.running.values()]:
                        self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}")

    @torch.no_grad()
    def step(self) -> None:
        self._admit()
        joined, first = self._prefill() if self.prefilling else ([], None)
        next_tokens = self._decode() if self.running else None
        launched = self._launch(joined, first, next_tokens)
        if self.pending is not None:
            self._deliver(self.pending)
        self.pending = launched

    def _admit(self) -> None:
        while self.free_slots:
            try:
                r = self.waiting.get_nowait()
            except queue.Empty:
                break
            if r.cancelled.is_set():
                continue
            if r.adapter is not None and r.adapter not in self.runner.lora.slots:
                r.finish_reason = "error"
                r.emit("error", f"adapter {r.adapter} is not loaded")
                continue
            seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little")
            self.prefilling.append(_Sequence(r, heapq.heappop(self.free_slots), self.runner.lora.slot_of(r.adapter), seed))
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting.qsize())

    def _prefill(self) -> tuple[list[_Sequence], torch.Tensor | None]:
        """One chunk of prompt tokens; requests whose prompt completes start decoding."""
        for seq in [s for s in self.prefilling if s.request.cancelled.is_set()]:
            self.prefilling.remove(seq)
            self._cancel(seq.request)
            self._release(seq)
        budget, pieces, joined = self.prefill_chunk, [], []
        for seq in self.prefilling:
            if budget == 0:
                break
            prompt = seq.request.prompt_ids
            n = min(budget, len(prompt) - seq.prefilled)
            pieces.append((seq.slot, prompt[seq.prefilled : seq.prefilled + n], seq.prefilled, seq.adapter))
            seq.prefilled += n
            budget -= n
            if seq.prefilled == len(prompt):
                joined.append(seq)
        if not pieces:
            return [], None
        logits = self.runner.prefill(pieces, want_logits=list(range(len(joined))))  # complete ones come first
        if not joined:
            return [], None
        rows = [s.request for s in joined]
        temps = self._tensor([r.temperature for r in rows], torch.float32)
        top_ps = self._tensor([r.top_p for r in rows], torch.float32)
        seeds = self._tensor([s.seed for s in joined], torch.long)
        first = sample(logits, temps, top_ps, seeds, torch.zeros_like(seeds), *self._flags(rows))
        st, slots = self.runner.state, self._tensor([s.slot for s in joined], torch.long)
        st.tokens[slots] = first
        st.positions[slots] = self._tensor([len(r.prompt_ids) for r in rows], torch.long)
        st.active[slots] = True
        st.adapter[slots] = self._tensor([s.adapter for s in joined], torch.long)
        st.temperature[slots], st.top_p[slots], st.seed[slots] = temps, top_ps, seeds
        st.counter[slots] = 1
        for seq in joined:
            self.prefilling.popleft()  # the complete ones are the first
            seq.length = len(seq.request.prompt_ids)
            self.running[seq.slot] = seq
        return joined, first

    def _decode(self) -> torch.Tensor:
        b = _bucket(max(self.running) + 1, 1, self.max_batch_size)
        L = _bucket(max(s.length for s in self.running.values()) + 1, 64, self.runner.cache_len)
        logits = self.graphs.decode(b, L) if self.graphs is not None else self.runner.decode(b, L)
        st = self.runner.state
        next_tokens = sample(logits, st.temperature[:b], st.top_p[:b], st.seed[:b], st.counter[:b],
                             *self._flags([s.request for s in self.running.values()]))
        self.runner.commit(b, next_tokens)
        for seq in self.running.values():
            seq.length += 1
        if self.metrics:
            self.metrics.batch_size.observe(len(self.running))
        return next_tokens

    def _launch(self, joined: list[_Sequence], first, next_tokens) -> _Launched | None:
        """Start copying the step's tokens to the host; ``_deliver`` reads them a step later."""
        parts = [t for t in (first, next_tokens) if t is not None]
        if not parts:
            return None
        tokens = torch.cat(parts)
        ready = None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            tokens, ready = host.copy_(tokens, non_blocking=True), torch.cuda.Event()
            ready.record()
        rows = list(self.running.values()) if next_tokens is not None else []
        return _Launched(joined, rows, tokens, ready)

    def _deliver(self, step: _Launched) -> None:
        if step.ready is not None:
            step.ready.synchronize()  # the step's one wait for the device
        host = step.tokens.tolist()
        for seq, token in zip(step.joined, host):
            self._advance(seq.request, token)
        offset = len(step.joined)
        for seq in step.rows:
            if seq.request.finish_reason is None:  # else: its extra token, computed before we knew
                self._advance(seq.request, host[offset + seq.slot])
        for seq in (*step.joined, *step.rows):  # a joined row is also in rows: _release is idempotent
            if seq.request.finish_reason is not None:
                self._release(seq)

    # ---- helpers ---------------------------------------------------------------------------

    def _release(self, seq: _Sequence) -> None:
        if seq.released:
            return
        seq.released = True
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.runner.state.active[seq.slot] = False
        heapq.heappush(self.free_slots, seq.slot)

    def _fail(self, seq: _Sequence, message: str) -> None:
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq.request.finish_reason is None:
            seq.request.finish_reason = "error"
            seq.request.emit("error", message)
        self._release(seq)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, self.device, dtype)

    @staticmethod
    def _flags(requests) -> tuple[bool, bool]:
        sampling = [r for r in requests if r.temperature >= GREEDY_BELOW]
        return bool(sampling), any(r.top_p < 1 for r in sampling)
