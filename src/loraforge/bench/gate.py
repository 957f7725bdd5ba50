"""Benchmark of the data gate: full-gate throughput, and the repetition check against datatrove.

``bench_gate`` measures, on real data replicated to a chosen size:

1. The whole gate (``run_gate``) with every check on: schema, empty/short answers, role order,
   special tokens, PII (mode ``flag``), repetition, eval overlap (13-grams against a small eval
   file made from the first records), length with the model's chat template, exact and near
   duplicates. Two inputs are gated:

   * ``unique`` (the main measured case): replica ``k >= 1`` of each record carries
     `` (variant k)`` at the end of its instruction (first user turn), so no record is an exact
     duplicate of another and the dedup stage does its full work (LSH look-up, then sketch
     verification of every candidate) instead of stopping at an exact-hash hit. Most replicas are
     still near duplicates of their original (a two-word suffix keeps the 5-gram Jaccard
     similarity above 0.85), as the reasons in the result show.
   * ``duplicates``: exact replicas. Every per-sample check still runs on each of them
     (duplicates are decided last, in the main process); only the dedup decision is cheaper.

   The tokenizer is loaded once beforehand (its first load converts it, ~15 s) and passed in,
   so throughput excludes it; ``samples_per_s`` is records over (wall - setup) seconds, per
   core is that divided by the worker processes used. ``check_seconds`` are the per-check
   seconds from the report, summed over workers (CPU time spent in each check).

2. The repetition check alone, in one process: loraforge's ``find_repetition`` against
   datatrove's ``GopherRepetitionFilter()`` at its defaults over the same assistant answers
   (texts/s each, their ratio), and how many answers each rejects per file. datatrove is
   optional and imported lazily; its English word splitter needs spaCy (``spacy.blank("en")``,
   no model download). Without them the datatrove fields are ``None`` with a note.

The result is returned as a dict and written to ``out_dir/bench_gate.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from loraforge.config import RepetitionConfig, load_config
from loraforge.gate.normalize import normalize
from loraforge.gate.readers import check_inputs, read_records
from loraforge.gate.repetition import find_repetition
from loraforge.gate.verdict import Reject

# Packages whose versions the result records (absent ones are reported as None).
_VERSIONED = ("loraforge", "transformers", "tokenizers", "numpy", "xxhash", "pydantic", "torch", "datatrove", "spacy")


def shared_data_dir() -> Path | None:
    """``shared/data`` beside the repository (the project's real test data), if there is one."""
    env = os.environ.get("LORAFORGE_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [parent / "shared" / "data" for parent in here.parents]
    candidates.append(Path.cwd().parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def _load_records(paths: list[Path]) -> list[tuple[Path, Any]]:
    check_inputs(paths)
    out = []
    for index, path in enumerate(paths):
        for record in read_records(path, index):
            value = record.value if record.text is None else json.loads(record.text)
            out.append((path, value))
    return out


def _with_suffix(record: Any, suffix: str) -> Any:
    """A copy of ``record`` whose instruction (its first user turn, whatever the format) ends in ``suffix``."""
    if not isinstance(record, dict):
        return record
    record = dict(record)
    if isinstance(record.get("instruction"), str):
        record["instruction"] += suffix
    elif isinstance(record.get("prompt"), str):
        record["prompt"] += suffix
    else:
        for key, role_key, text_key, roles in (("messages", "role", "content", {"user"}), ("conversations", "from", "value", {"human", "user"})):
            turns = record.get(key)
            if isinstance(turns, list):
                turns = [dict(t) if isinstance(t, dict) else t for t in turns]
                for turn in turns:
                    if isinstance(turn, dict) and str(turn.get(role_key, "")).lower() in roles and isinstance(turn.get(text_key), str):
                        turn[text_key] += suffix
                        break
                record[key] = turns
                break
    return record


def _write_replicas(records: list[Any], n: int, path: Path, unique: bool) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            replica, record = divmod(i, len(records))
            value = records[record]
            if unique and replica:
                value = _with_suffix(value, f" (variant {replica})")
            out.write(json.dumps(value, ensure_ascii=False) + "\n")


def _assistant_texts(records: list[Any]) -> list[str]:
    texts = []
    for record in records:
        messages = normalize(record)
        if not isinstance(messages, Reject):
            texts.extend(m["content"] for m in messages if m["role"] == "assistant")
    return texts


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in _VERSIONED},
    }


def _loraforge_rule(why: str) -> str:
    """The rule of ``find_repetition`` behind a reason it gave."""
    for prefix, rule in (("the character", "char_run"), ("loop:", "loop"), ("the most frequent", "top_ngram_char_frac"), ("repeated", "dup_ngram_char_frac")):
        if why.startswith(prefix):
            return rule
    return "dup_line_frac" if "lines repeat" in why else "other"


def _datatrove_filter():
    """(GopherRepetitionFilter at its defaults, None) or (None, why it is not available)."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherRepetitionFilter
    except ImportError as exc:
        return None, f"datatrove is not installed ({exc}); pip install datatrove spacy"
    gopher = GopherRepetitionFilter()
    try:  # the first call builds the word tokenizer (spaCy for English): not part of the timing
        gopher.filter(Document(text="warm up the word tokenizer.", id="warmup"))
    except ImportError as exc:
        return None, f"datatrove's GopherRepetitionFilter cannot run: {exc}"
    return (gopher, Document), None


def _datatrove_rejects(result) -> tuple[bool, str]:
    """datatrove filters return True (keep), False, or (False, reason)."""
    if isinstance(result, tuple):
        return (not result[0]), (result[1] if len(result) > 1 and result[1] else "rejected")
    return (not result), "rejected"


def _bench_repetition(texts: list[str], per_file: dict[str, list[str]], with_datatrove: bool) -> dict[str, Any]:
    cfg = RepetitionConfig()
    started = time.perf_counter()
    for text in texts:
        find_repetition(text, cfg)
    lf_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "texts": len(texts),
        "loraforge": {"seconds": round(lf_s, 3), "texts_per_s": round(len(texts) / max(lf_s, 1e-9), 1)},
        "datatrove": None,
        "ratio_loraforge_over_datatrove": None,
        "datatrove_note": None,
        "rejections": {},
    }
    dt, note = _datatrove_filter() if with_datatrove else (None, "skipped (with_datatrove=False)")
    if dt is not None:
        gopher, Document = dt
        started = time.perf_counter()
        for i, text in enumerate(texts):
            gopher.filter(Document(text=text, id=str(i)))
        dt_s = time.perf_counter() - started
        result["datatrove"] = {
            "seconds": round(dt_s, 3),
            "texts_per_s": round(len(texts) / max(dt_s, 1e-9), 1),
            "version": _version("datatrove"),
            "spacy_version": _version("spacy"),
            "filter": "GopherRepetitionFilter() at its defaults (language en), filter(Document) called directly",
        }
        result["ratio_loraforge_over_datatrove"] = round(dt_s / max(lf_s, 1e-9), 2)
    else:
        result["datatrove_note"] = note
    for name, file_texts in per_file.items():
        lf = Counter(_loraforge_rule(why) for t in file_texts if (why := find_repetition(t, cfg)))
        row: dict[str, Any] = {
            "texts": len(file_texts),
            "loraforge_rejects": sum(lf.values()),
            "loraforge_by_rule": dict(lf.most_common()),
            "datatrove_rejects": None,
            "datatrove_by_rule": None,
        }
        if dt is not None:
            gopher, Document = dt
            reasons = Counter()
            for i, text in enumerate(file_texts):
                rejected, why = _datatrove_rejects(gopher.filter(Document(text=text, id=str(i))))
                if rejected:
                    reasons[why] += 1
            row["datatrove_rejects"] = sum(reasons.values())
            row["datatrove_by_rule"] = dict(reasons.most_common())
        result["rejections"][name] = row
    return result


def _gate_case(name: str, input_path: Path, out_dir: Path, overrides: dict[str, Any], tokenizer) -> dict[str, Any]:
    from loraforge.gate import run_gate

    report = run_gate([input_path], out_dir, load_config(None, overrides), tokenizer=tokenizer)
    t = report.timings
    workers = int(t["workers"])
    seconds = t["wall_s"] - t["setup_s"]
    per_s = report.input / max(seconds, 1e-9)
    return {
        "case": name,
        "input": str(input_path),
        "out_dir": str(out_dir),
        "records": report.input,
        "workers": workers,
        "wall_s": t["wall_s"],
        "setup_s": t["setup_s"],
        "seconds": round(seconds, 3),
        "samples_per_s": round(per_s, 1),
        "samples_per_s_per_core": round(per_s / workers, 1),
        "check_seconds": {k[len("check_") : -len("_s")]: v for k, v in t.items() if k.startswith("check_")},
        "kept": report.kept,
        "rejected": report.rejected,
        "reasons": dict(sorted(report.reasons.items(), key=lambda kv: -kv[1])),
    }


def bench_gate(
    data_files: list[Path],
    records: int = 100_000,
    workers: int | None = None,
    *,
    out_dir: Path,
    with_datatrove: bool = True,
    repetition_texts: int = 20_000,
    eval_records: int = 50,
    with_duplicates: bool = True,
    reject_files: list[Path] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark the gate on ``data_files`` replicated to ``records`` records; write and return the numbers.

    ``workers``: gate worker processes (None: one per core). ``repetition_texts``: assistant
    answers of ``data_files`` replicated to this many for the repetition timing.
    ``reject_files``: files whose assistant turns get rejection counts (default: ``data_files``
    plus the shared ShareGPT file when ``shared/data`` is found). ``log``: progress lines.
    """
    say = log or (lambda _msg: None)
    data_files = [Path(p) for p in data_files]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if records < 1:
        raise ValueError("records must be at least 1")
    sources = [value for _, value in _load_records(data_files)]
    if not sources:
        raise ValueError(f"no records in {', '.join(map(str, data_files))}")

    # -- inputs ----------------------------------------------------------------------------
    unique_path, dup_path = out_dir / "bench_input_unique.jsonl", out_dir / "bench_input.jsonl"
    _write_replicas(sources, records, unique_path, unique=True)
    if with_duplicates:
        _write_replicas(sources, records, dup_path, unique=False)
    eval_path = out_dir / "eval.jsonl"
    with open(eval_path, "w", encoding="utf-8") as out:
        written = 0
        for value in sources:
            messages = normalize(value)
            if isinstance(messages, Reject):
                continue
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            written += 1
            if written >= eval_records:
                break
    say(f"inputs: {records:,} records from {len(sources):,} source records; eval file of {written} records")

    # -- the whole gate --------------------------------------------------------------------
    config = load_config(None, {"gate.workers": workers})
    started = time.perf_counter()
    from loraforge.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.name)
    tokenizer_s = time.perf_counter() - started
    say(f"tokenizer of {config.model.name} loaded in {tokenizer_s:.1f}s (not timed)")
    overrides = {
        "gate.workers": workers,
        "gate.checks.pii.mode": "flag",
        "gate.checks.eval_overlap.files": [str(eval_path)],
    }
    gate: dict[str, Any] = {"main_case": "unique"}
    say(f"gate (unique variant): {records:,} records ...")
    gate["unique"] = _gate_case("unique", unique_path, out_dir / "gated", overrides, tokenizer)
    say(f"  {gate['unique']['samples_per_s']:,} samples/s, {gate['unique']['samples_per_s_per_core']:,} per core")
    if with_duplicates:
        say(f"gate (exact duplicates): {records:,} records ...")
        gate["duplicates"] = _gate_case("duplicates", dup_path, out_dir / "gated_duplicates", overrides, tokenizer)
        say(f"  {gate['duplicates']['samples_per_s']:,} samples/s, {gate['duplicates']['samples_per_s_per_core']:,} per core")

    # -- repetition alone ------------------------------------------------------------------
    answers = _assistant_texts(sources)
    texts = [answers[i % len(answers)] for i in range(repetition_texts)] if answers else []
    if reject_files is None:
        reject_files = list(data_files)
        shared = shared_data_dir()
        sharegpt = shared / "sharegpt_conversations_500.json" if shared else None
        if sharegpt is not None and sharegpt.is_file() and sharegpt.resolve() not in {p.resolve() for p in reject_files}:
            reject_files.append(sharegpt)
    per_file = {str(p): _assistant_texts([v for _, v in _load_records([Path(p)])]) for p in reject_files}
    say(f"repetition: {len(texts):,} texts, loraforge vs datatrove ...")
    repetition = _bench_repetition(texts, per_file, with_datatrove)

    result = {
        "benchmark": "gate",
        "machine": _machine(),
        "data_files": [str(p) for p in data_files],
        "source_records": len(sources),
        "records": records,
        "eval_file": str(eval_path),
        "eval_records": written,
        "eval_note": "the eval records are the first source records, so their replicas in the input are eval_overlap rejections",
        "tokenizer_load_s": round(tokenizer_s, 3),
        "gate": gate,
        "repetition": repetition,
    }
    (out_dir / "bench_gate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
