"""``loraforge eval``: the base model and the adapter side by side on the same held-out data.

```python
from loraforge.eval import evaluate
result = evaluate("runs/orders", "test.jsonl", require=["exact_match>=0.8"], require_better_than_base=True)
result.adapter["field_accuracy"], result.promotion.passed      # also written to runs/orders/eval.json
```

One sample, from the test file to a number (``samples`` -> ``runner`` -> ``metrics`` ->
``promotion``):

```
read_samples     any format the gate reads; a bad line or no final assistant turn stops with file:line
detect_task      every reference a JSON object -> json, else text (--task forces one)
load_run         base model + PEFT adapter, one copy in memory; base = `with model.disable_adapter()`,
                 then the adapter (merged into the weights in fp32)
loss             trainer's ChatTokenizer labels + collate + token_loss_sum, per model
generate         greedy, left-padded, continuous batches of --batch-size rows (freed slots refill),
                 stop at EOS / end of turn or max_new_tokens
metrics          json: json_valid, json_extractable, field_accuracy, exact_match | text: exact_match, rouge_l
promotion        --require METRIC OP NUMBER (adapter's metrics), --require-better-than-base
```

``RUN_DIR/eval.json`` (read by the run report; keep it stable)::

    {
      "data":     {"file": str, "sha256": str, "samples": int,
                   "loss_samples": int},            # samples with assistant tokens left after truncation
      "task":     "json" | "text",
      "base":     {METRIC: float, ..., "loss": float, "perplexity": float},
      "adapter":  {same keys as "base"},
                  # json: json_valid, json_extractable, field_accuracy, exact_match (means in [0, 1])
                  # text: exact_match, rouge_l
      "examples": [{"prompt": str,                  # the last user turn before the answer
                    "reference": str, "base": str, "adapter": str,
                    "base_correct": bool, "adapter_correct": bool}],   # correct = exact_match
      "promotion": {"passed": bool,                 # true when there are no checks
                    "checks": [{"requirement": str, # "exact_match>=0.8", "field_accuracy > base (0.25)", "loss < base (1.9)"
                                "value": float,     # the adapter's value of that metric
                                "passed": bool}]},
      "timings":  {"load_s" (data + model), "loss_s" (both models), "generate_base_s",
                   "generate_adapter_s", "total_s", "tokens_per_s": float (seconds, rounded to ms),
                   "generated_tokens_base", "generated_tokens_adapter": int},
      "settings": {"model": str, "adapter": str, "task": "auto" | "json" | "text" (as asked),
                   "max_new_tokens": int, "batch_size": int, "max_seq_length": int, "examples": int,
                   "decoding": "greedy", "device": str, "dtype": str,
                   "require": [str], "require_better_than_base": bool}
    }
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import ConfigError, EvalError
from loraforge.eval.metrics import detect_task, mean_scores, metric_names, parse_json_object, per_example
from loraforge.eval.promotion import Check, Promotion, Requirement, check_known, decide, parse_requirement
from loraforge.eval.samples import EvalSample, read_samples
from loraforge.gate.readers import sha256_of

__all__ = [
    "Check", "EvalResult", "EvalSample", "Promotion", "Requirement", "evaluate", "metric_names",
    "parse_requirement", "read_samples",
]

TASKS = ("auto", "json", "text")
MODELS = ("base", "adapter")


@dataclass
class EvalResult:
    data: dict
    task: str
    base: dict[str, float]
    adapter: dict[str, float]
    examples: list[dict]
    promotion: Promotion
    timings: dict[str, float]
    settings: dict
    path: Path | None = field(default=None, compare=False)  # where eval.json was written

    def to_json(self) -> dict:
        return {
            "data": self.data, "task": self.task, "base": self.base, "adapter": self.adapter,
            "examples": self.examples, "promotion": self.promotion.to_json(), "timings": self.timings,
            "settings": self.settings,
        }


def resolve_task(task: str, samples: list[EvalSample], path: Path) -> str:
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "auto":
        return detect_task([s.reference for s in samples])
    if task == "json":
        for s in samples:
            if parse_json_object(s.reference) is None:
                raise EvalError(f"{path}:{s.line}: --task json needs every reference to be a JSON object, got {s.reference[:80]!r}")
    return task


def evaluate(
    run_dir: Path | str,
    data: Path | str,
    *,
    max_new_tokens: int = 128,  # the demo's answers are ~30 tokens; long enough for a short paragraph
    batch_size: int = 16,  # rows decoding at once (freed slots refill): a CPU step costs about the same for 4 rows as for 16; raise it on a GPU
    task: str = "auto",
    examples: int = 5,
    require: list[str] | None = None,
    require_better_than_base: bool = False,
    show_progress: bool = False,
    console=None,
    device=None,
) -> EvalResult:
    """Evaluate base and adapter on ``data``, decide promotion, write ``RUN_DIR/eval.json``.

    Never raises because of the promotion decision: ``result.promotion.raise_if_failed()``
    does that (the CLI calls it, for exit code 3).
    """
    started = time.perf_counter()
    if max_new_tokens < 1 or batch_size < 1 or examples < 0:
        raise ConfigError("--max-new-tokens and --batch-size must be at least 1, --examples at least 0")
    run_dir, data = Path(run_dir), Path(data)
    requirements = [parse_requirement(r) for r in require or []]
    samples = read_samples(data)
    asked, task = task, resolve_task(task, samples, data)
    check_known(requirements, task)  # before minutes of model work, not after

    from loraforge.eval import runner

    run = runner.load_run(run_dir, device)
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}  # data + model
    tokenized = runner.tokenize_for_loss(run, samples)
    if not tokenized:
        raise EvalError(f"{data}: no sample keeps an assistant token within max_seq_length {run.max_seq_length}")
    progress = _Progress(show_progress, console, 2 * len(samples))
    losses, answers = _run_models(run, samples, tokenized, batch_size, max_new_tokens, timings, progress)
    references = [s.reference for s in samples]
    rows = {which: per_example(task, answers[which], references) for which in MODELS}
    scores = {which: {**mean_scores(rows[which], task), **losses[which]} for which in MODELS}
    promotion = decide(requirements, require_better_than_base, task, scores["base"], scores["adapter"])
    timings["total_s"] = time.perf_counter() - started
    result = EvalResult(
        data={"file": str(data), "sha256": sha256_of(data), "samples": len(samples), "loss_samples": len(tokenized)},
        task=task,
        base=scores["base"],
        adapter=scores["adapter"],
        examples=[
            {"prompt": s.prompt_text, "reference": s.reference, "base": answers["base"][i], "adapter": answers["adapter"][i],
             "base_correct": rows["base"][i]["exact_match"] == 1.0, "adapter_correct": rows["adapter"][i]["exact_match"] == 1.0}
            for i, s in enumerate(samples[:examples])
        ],
        promotion=promotion,
        timings={k: round(v, 3) for k, v in timings.items()},
        settings={
            "model": run.base_name, "adapter": str(run.adapter_path), "task": asked,
            "max_new_tokens": max_new_tokens, "batch_size": batch_size, "max_seq_length": run.max_seq_length,
            "examples": examples, "decoding": "greedy", "device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
            "require": [str(r) for r in requirements], "require_better_than_base": require_better_than_base,
        },
    )
    result.path = _write_json(run_dir / "eval.json", result.to_json())
    return result


def _run_models(run, samples: list[EvalSample], tokenized: list, batch_size: int, max_new_tokens: int, timings: dict, progress):
    """Loss and greedy answers of the base model, then of the adapter (base first: see ``LoadedRun.weights``).

    Times and generated-token counts go to ``timings``.
    """
    from loraforge.eval import runner

    prompts = runner.encode_prompts(run, samples)
    losses, answers = {}, {}
    timings["loss_s"] = 0.0
    with progress:
        for which in MODELS:
            with run.weights(which):
                progress.label(f"loss ({which})")
                t = time.perf_counter()
                losses[which] = runner.loss_on_assistant_tokens(run, tokenized, batch_size)
                timings["loss_s"] += time.perf_counter() - t
                progress.label(f"generating ({which})")
                t = time.perf_counter()
                answers[which], timings[f"generated_tokens_{which}"] = runner.generate_answers(run, prompts, batch_size, max_new_tokens, progress.advance)
                timings[f"generate_{which}_s"] = time.perf_counter() - t
    seconds = timings["generate_base_s"] + timings["generate_adapter_s"]
    timings["tokens_per_s"] = (timings["generated_tokens_base"] + timings["generated_tokens_adapter"]) / max(seconds, 1e-9)
    return losses, answers


def _write_json(path: Path, payload: dict) -> Path:
    """Written to a temp file and renamed: a reader never sees half an eval.json."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return path


class _Progress:
    """A rich progress bar over generated answers, base then adapter (or nothing)."""

    def __init__(self, show: bool, console, total: int):
        self.show, self.console, self.total = show, console, total
        self.bar = self.task = None

    def __enter__(self):
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("answers"),
                                TimeElapsedColumn(), console=self.console, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("generating", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def label(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
