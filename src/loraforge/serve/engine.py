"""The generation engine: one thread that batches waiting requests and decodes them together.

Dynamic batching: requests that wait when a batch starts (up to ``max_batch_size``) are
decoded together, each with its own adapter (PEFT mixed-adapter batches: one forward pass,
``adapter_names`` per row, ``__base__`` for the base model), sampling settings, stop
strings and token limit; each streams its tokens as they come. Prompts are left-padded with
a matching attention mask and position ids, so a row's tokens do not depend on its
neighbours (greedy decoding gives the same tokens alone or in a batch; tested).

The seam for faster engines: ``EngineBase`` holds what every engine shares (the bounded
queue behind ``submit``, streaming tokens as text with stop strings, EOS, limits and
cancellation); an engine adds how it runs the model. ``Engine`` here is the reference (any
model transformers and PEFT run); ``serve.fast.FastEngine`` is the Llama engine with
continuous batching, a static KV cache, batched LoRA and CUDA graphs. ``create_engine``
picks one from ``serve.engine``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger("loraforge.serve")
BASE = "__base__"
# Below this temperature sampling is greedy: logits / 1e-300 overflow to inf and softmax to NaN.
GREEDY_BELOW = 1e-4


class QueueFull(Exception):
    """The bounded queue is full: the caller answers 429."""


class RequestTooLong(ValueError):
    """Prompt + max_tokens do not fit the engine's sequence length: the caller answers 400."""


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    tokenizer: object
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    # incremental detokenization: text of generated[:read_offset] is known, decoded from prefix_offset
    decoded: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class EngineBase:
    """The queue behind ``submit`` and the token -> text stream every engine shares."""

    def __init__(self, tokenizer, max_queue: int, metrics=None):
        self.tokenizer = tokenizer
        self.waiting: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.metrics = metrics
        self.stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.lock = threading.Lock()  # held while the model runs: adapter load/unload waits for it
        self._thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self._running = True

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._running = False

    def submit(self, request: GenRequest) -> None:
        try:
            self.waiting.put_nowait(request)
        except queue.Full as exc:
            raise QueueFull() from exc
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting.qsize())

    def _loop(self) -> None:
        raise NotImplementedError

    # ---- tokens -> text, shared by the engines ------------------------------------------

    def _cancel(self, r: GenRequest) -> None:
        """The client went away: record it and stop spending compute on the request."""
        r.finish_reason = "cancelled"
        if self.metrics:
            self.metrics.requests.labels("cancelled").inc()

    def _advance(self, r: GenRequest, token: int) -> None:
        if r.cancelled.is_set():
            self._cancel(r)
            return
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self._finish(r, "stop")
            return
        r.generated.append(token)
        text = self._decoded_text(r)
        if text is None:  # an incomplete UTF-8 sequence: wait for the next token
            if len(r.generated) >= r.max_tokens:
                self._finish(r, "length")
            return
        for stop in r.stops:
            at = text.find(stop, max(0, len(r.text) - len(stop)))
            if at >= 0:
                self._emit_delta(r, text[:at])
                self._finish(r, "stop")
                return
        self._emit_delta(r, text)
        if len(r.generated) >= r.max_tokens:
            self._finish(r, "length")

    @staticmethod
    def _emit_delta(r: GenRequest, text: str) -> None:
        if len(text) > len(r.text):
            r.emit("delta", text[len(r.text) :])
            r.text = text

    @staticmethod
    def _finish(r: GenRequest, reason: str) -> None:
        r.finish_reason = reason
        r.emit("done", reason)

    @staticmethod
    def _decoded_text(r: GenRequest) -> str | None:
        """The text of all generated tokens, decoding only the last few (None: incomplete UTF-8).

        Decodes ``generated[prefix_offset:]`` against ``generated[prefix_offset:read_offset]``
        and appends the difference (vLLM's method): the same text as decoding everything, at a
        constant cost per token, and tokenizers that drop a leading space at the start of a
        decode (SentencePiece) still see the token before.
        """
        ids = r.generated
        before = r.tokenizer.decode(ids[r.prefix_offset : r.read_offset], skip_special_tokens=True)
        after = r.tokenizer.decode(ids[r.prefix_offset :], skip_special_tokens=True)
        if after.endswith("\ufffd"):
            return None
        r.decoded += after[len(before) :]
        r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        return r.decoded


class Engine(EngineBase):
    """The reference engine: dynamic batches through transformers + PEFT (any model)."""

    def __init__(self, model, tokenizer, device: torch.device, max_batch_size: int, max_queue: int, metrics=None):
        super().__init__(tokenizer, max_queue, metrics)
        self.model = model
        self.device = device
        self.max_batch_size = max_batch_size

    def add_adapter(self, name: str, path) -> None:
        from peft import PeftModel

        with self.lock:
            if hasattr(self.model, "peft_config"):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self.model.delete_adapter(name)

    def _loop(self) -> None:
        while self._running:
            try:
                first = self.waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled.is_set()]
            if self.metrics:
                self.metrics.queue_depth.set(self.waiting.qsize())
                self.metrics.batch_size.observe(len(batch))
            if not batch:
                continue
            try:
                with self.lock:
                    self.run_batch(batch)
            except Exception as exc:  # a failed batch fails its requests, never the engine
                log.exception("generation failed")
                for r in batch:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.emit("error", f"generation failed: {type(exc).__name__}: {exc}")

    # ---- the one place that touches the model ---------------------------------------------

    @torch.no_grad()
    def run_batch(self, batch: list[GenRequest]) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        n = len(batch)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[b, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {}
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = [r.adapter or BASE for r in batch]
        generators = [self._generator(r) for r in batch]
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **kwargs)
        logits = out.logits[:, -1]
        for _ in range(max(r.max_tokens for r in batch)):
            next_ids = torch.stack([self._sample(logits[b], r, generators[b]) for b, r in enumerate(batch)])
            alive = False
            for b, r in enumerate(batch):
                if r.finish_reason is None:
                    self._advance(r, int(next_ids[b]))
                    alive |= r.finish_reason is None
            if not alive:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **kwargs)
            logits = out.logits[:, -1]

    def _generator(self, r: GenRequest) -> torch.Generator | None:
        if r.temperature < GREEDY_BELOW:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(r.seed if r.seed is not None else int.from_bytes(__import__("os").urandom(4), "little"))
        return g

    @staticmethod
    def _sample(logits: torch.Tensor, r: GenRequest, generator) -> torch.Tensor:
        if r.temperature < GREEDY_BELOW or generator is None:
            return logits.argmax()
        probs = torch.softmax(logits.float() / r.temperature, dim=-1)
        if r.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < r.top_p
            keep[0] = True  # the most likely token always stays (top_p may underflow to 0 in float32)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return torch.multinomial(probs, 1, generator=generator)[0]


def create_engine(cfg, model, tokenizer, device: torch.device, metrics=None) -> EngineBase:
    """The engine ``cfg.engine`` (a ``ServeConfig``) asks for: auto = fast where it supports the model."""
    if cfg.engine != "hf":  # hf: neither the fast engine's import (Triton on GPUs) nor its model checks
        from loraforge.serve.fast import FastEngine, unsupported_reason

        reason = unsupported_reason(model)
        if not reason:
            return FastEngine(model, tokenizer, device, cfg.max_batch_size, cfg.max_queue, metrics,
                              max_seq_len=cfg.max_seq_len, prefill_chunk=cfg.prefill_chunk, cuda_graphs=cfg.cuda_graphs)
        if cfg.engine == "fast":
            from loraforge.errors import ServeError

            raise ServeError(f"serve.engine=fast cannot serve this model: {reason}; use serve.engine=hf")
        log.info("engine: hf (the fast engine does not serve %s)", reason)
    return Engine(model, tokenizer, device, cfg.max_batch_size, cfg.max_queue, metrics)
