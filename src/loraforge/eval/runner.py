"""The one place evaluation touches the model: loading, loss on assistant tokens, greedy decoding.

One model in memory: the base model wrapped by PEFT with the run's adapter; the base pass runs
inside ``model.disable_adapter()``, which is exactly the base model (LoRA's ``B A x`` term
switched off), and in fp32 the adapter pass runs with the adapter merged (``LoadedRun.weights``
says why). Both passes see the same token ids: the prompts are rendered with the adapter's
stored chat template (the one it was trained and is served with), so differences between the
two columns come from the weights alone.

Loss is the trainer's: ``ChatTokenizer`` labels every assistant token of the conversation,
``collate`` builds the batch (one sample a row, no packing), ``token_loss_sum`` sums the
cross-entropy; loss = sum / supervised tokens over the whole file, perplexity = exp(loss).

Generation is greedy, batched and left-padded, continuously: prompts go in shortest first, a
row leaves the batch (and its KV cache) as soon as it emits a stop token or reaches
max_new_tokens, and waiting prompts are prefilled into the freed slots, so one rambling answer
neither keeps finished rows computing nor holds back the next prompts (``greedy_generate``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import EvalError, TrainError
from loraforge.eval.samples import EvalSample
from loraforge.train.batch import collate, token_loss_sum
from loraforge.train.data import ChatTokenizer, truncate
from loraforge.train.model import pick_device

DEFAULT_MAX_SEQ_LENGTH = 2048  # when the run's manifest does not say what it trained with


@dataclass
class LoadedRun:
    model: object  # PeftModel, eval mode
    tokenizer: object  # the adapter's own (chat template included)
    device: torch.device
    dtype: torch.dtype
    base_name: str
    adapter_path: Path
    max_seq_length: int

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    @contextlib.contextmanager
    def weights(self, which: str):
        """Context in which ``self.model`` is the base model (``base``) or base + LoRA (``adapter``).

        In fp32 the adapter is merged into the weights for the duration (and unmerged after):
        W + (alpha/r) B A is exact to float32 rounding, and on a CPU the two extra small
        matmuls per adapted layer are slow (merged, the demo model decodes 1.4x faster on 2 idle
        cores, 16 rows: 236 vs 337 ms a step; more on busy cores). In bf16 the update would be rounded into the weights, so the
        adapter stays unmerged, as serving runs it. Callers run the base first, so the base
        column never sees weights that were merged and unmerged.
        """
        if which == "base":
            with self.model.disable_adapter():
                yield
        elif self.dtype == torch.float32:
            self.model.base_model.merge_adapter()
            try:
                yield
            finally:
                self.model.base_model.unmerge_adapter()
        else:
            yield


def _manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: not valid JSON ({exc})") from exc


def find_adapter(run_dir: Path) -> Path:
    """RUN_DIR/adapter (or RUN_DIR itself when it is an adapter folder); an EvalError otherwise."""
    from loraforge.train.merge import adapter_dir

    try:
        return adapter_dir(run_dir)
    except TrainError as exc:
        raise EvalError(f"{run_dir}: no adapter to evaluate (expected {run_dir / 'adapter'}/adapter_config.json); train one with `loraforge train --out {run_dir}`") from exc


def load_run(run_dir: Path, device: torch.device | None = None) -> LoadedRun:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraforge.models import load_causal_lm, load_tokenizer

    run_dir = Path(run_dir)
    adapter = find_adapter(run_dir)
    manifest = _manifest(run_dir if adapter != run_dir else run_dir.parent)
    base_name = manifest.get("model") or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    max_seq_length = (manifest.get("config") or {}).get("train", {}).get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
    device = device or pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(adapter) if (adapter / "tokenizer_config.json").is_file() else load_tokenizer(base_name)
    base = load_causal_lm(base_name, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return LoadedRun(model, tokenizer, device, dtype, base_name, adapter, int(max_seq_length))


def stop_ids(tokenizer, model) -> set[int]:
    """EOS, the ChatML end of turn when the vocabulary has it, and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if isinstance(i, int) and i >= 0}


# ---- loss ------------------------------------------------------------------------------------


def tokenize_for_loss(run: LoadedRun, samples: list[EvalSample]) -> list:
    tokenize = ChatTokenizer(run.tokenizer)
    tokenized = (truncate(tokenize(s.messages), run.max_seq_length) for s in samples)
    return [t for t in tokenized if t is not None]  # None: no assistant token left after truncation


@torch.no_grad()
def loss_on_assistant_tokens(run: LoadedRun, tokenized: list, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy over every assistant token of the file, and its perplexity (call inside ``run.weights``)."""
    ordered = sorted(tokenized, key=lambda t: len(t.input_ids))  # similar lengths share a batch
    loss_sum, supervised = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        b = collate([[t] for t in ordered[start : start + batch_size]], run.pad_id).to(run.device)
        logits = run.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        loss_sum += float(token_loss_sum(logits, b.labels))
        supervised += b.supervised
    loss = loss_sum / max(supervised, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp(700) is near float max


# ---- generation ------------------------------------------------------------------------------


def encode_prompts(run: LoadedRun, samples: list[EvalSample]) -> list[list[int]]:
    """Each sample's conversation before its last answer, with the generation prompt, as token ids."""
    tokenize = ChatTokenizer(run.tokenizer)
    texts = [tokenize.renderer.render(s.prompt_messages, add_generation_prompt=True) for s in samples]
    return [list(e.ids) for e in tokenize.backend.encode_batch(texts, add_special_tokens=False)]


def _forward_kwargs(model) -> Callable[..., dict]:
    """``kwargs(cache, prefill=False)`` for the model's forward: the KV-cache argument under its
    name (transformers 5.2x renames ``past_key_values`` to ``cache``), and for a prefill
    ``logits_to_keep=1`` where supported, which skips the vocabulary projection of every prompt
    position but the last (16 x 70 x 49k floats on the demo model)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(inner).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def kwargs(cache, prefill: bool = False) -> dict:
        return {name: cache, "use_cache": True, **(last_only if prefill else {})}

    return kwargs


@dataclass
class _Rows:
    """The rows decoding together: one KV cache, its padding mask, each row's last position and next-token logits."""

    ids: list[int]  # which prompt each row is
    cache: object  # DynamicCache, (rows, heads, T, dim) per layer
    mask: torch.Tensor  # (rows, T): 1 for real tokens, 0 for left padding
    last: torch.Tensor  # (rows, 1): position of each row's last token
    logits: torch.Tensor  # (rows, vocab): logits of each row's next token

    def select(self, keep: torch.Tensor) -> _Rows:
        """Only the rows ``keep``; padding columns no row needs any more are cut off the cache."""
        self.cache.batch_select_indices(keep)
        rows = _Rows([self.ids[i] for i in keep.tolist()], self.cache, self.mask[keep], self.last[keep], self.logits[keep])
        first = int(rows.mask.any(0).int().argmax())  # the first column holding a real token of some row
        if first > 0 and _mergeable(rows.cache):  # else the cache keeps them: correct, just wider
            from transformers import DynamicCache

            rows.cache = DynamicCache([(x.keys[:, :, first:], x.values[:, :, first:]) for x in rows.cache.layers])
            rows.mask = rows.mask[:, first:]
        return rows


def _prefill(model, prompts: list[list[int]], ids: list[int], pad_id: int, device, forward: Callable[..., dict]) -> _Rows:
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, **forward(cache, prefill=True)).logits[:, -1]
    return _Rows(ids, cache, mask, positions[:, -1:], logits)


def _mergeable(cache) -> bool:
    """Plain full-attention cache layers, whose tensors can be left-padded and stacked; else no refill."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _merge(a: _Rows, b: _Rows) -> _Rows:
    """Two groups of rows as one: caches and masks left-padded to the same length, then stacked."""
    from transformers import DynamicCache

    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    layers = [(torch.cat([pad(x.keys, 2), pad(y.keys, 2)]), torch.cat([pad(x.values, 2), pad(y.values, 2)])) for x, y in zip(a.cache.layers, b.cache.layers)]
    return _Rows(a.ids + b.ids, DynamicCache(layers), torch.cat([pad(a.mask, 1), pad(b.mask, 1)]), torch.cat([a.last, b.last]), torch.cat([a.logits, b.logits]))


def _step(model, rows: _Rows, next_ids: torch.Tensor, forward: Callable[..., dict]) -> _Rows:
    mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.ids), 1))], dim=1)
    last = rows.last + 1
    logits = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=last, **forward(rows.cache)).logits[:, -1]
    return _Rows(rows.ids, rows.cache, mask, last, logits)


@torch.no_grad()
def greedy_generate(
    model, prompts: list[list[int]], pad_id: int, stops: set[int], max_new_tokens: int, device,
    batch_size: int | None = None, on_done: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of ``prompts``, each ending before its first stop token.

    At most ``batch_size`` rows decode together (all of them by default). A decode step costs
    little more for 16 rows than for 4 (on a CPU it mostly reads the weights), so rows that
    finish leave the batch and, once a quarter of it is free, waiting prompts are prefilled and
    join it: the step count follows the tokens generated, not the number of batches times the
    longest answer of each (the demo's base model: 200 steps instead of 272 for 40 prompts in
    slots of 16). The cache stays as wide as its longest row needs: columns of padding only are
    cut when rows leave. ``on_done(i)`` is called as prompt i finishes.
    """
    forward = _forward_kwargs(model)
    batch_size = batch_size or len(prompts)
    refill_at = max(1, batch_size // 4)
    stop_tensor = torch.tensor(sorted(stops) or [-1], device=device)
    waiting = deque(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    rows: _Rows | None = None
    while waiting or rows is not None:
        free = batch_size - (len(rows.ids) if rows else 0)
        if waiting and (rows is None or (free >= min(refill_at, len(waiting)) and _mergeable(rows.cache))):
            admitted = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            new = _prefill(model, [prompts[i] for i in admitted], admitted, pad_id, device, forward)
            rows = new if rows is None else _merge(rows, new)
        next_ids = rows.logits.argmax(-1)
        stopped = torch.isin(next_ids, stop_tensor).tolist()
        finished = []
        for i, token, stop in zip(rows.ids, next_ids.tolist(), stopped):
            if not stop:
                outputs[i].append(token)
            finished.append(stop or len(outputs[i]) >= max_new_tokens)
        for i, done in zip(rows.ids, finished):
            if done and on_done is not None:
                on_done(i)
        if all(finished):
            rows = None
            continue
        if any(finished):  # finished rows leave the batch and the cache
            keep = torch.tensor([b for b, done in enumerate(finished) if not done], device=device)
            rows, next_ids = rows.select(keep), next_ids[keep]
        rows = _step(model, rows, next_ids, forward)
    return outputs


def generate_answers(
    run: LoadedRun, prompts: list[list[int]], batch_size: int, max_new_tokens: int, on_done: Callable[[], None] | None = None,
) -> tuple[list[str], int]:
    """Decoded greedy answers in input order, and the number of tokens generated (call inside ``run.weights``).

    Prompts go in shortest first: rows prefilled together pad less.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = greedy_generate(
        run.model, [prompts[i] for i in order], run.pad_id, stop_ids(run.tokenizer, run.model), max_new_tokens, run.device,
        batch_size, on_done=(lambda _: on_done()) if on_done else None,
    )
    answers: list[str] = [""] * len(prompts)
    for i, tokens in zip(order, outputs):
        answers[i] = run.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return answers, sum(len(t) for t in outputs)
