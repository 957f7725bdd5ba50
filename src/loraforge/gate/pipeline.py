"""Run the gate: read -> normalize -> per-sample checks (workers) -> duplicates (in order) -> write.

Flow of one record::

    readers.read_records ──chunks──> worker: SampleGate.process_chunk
        parse JSON ── normalize ── checks.* ── dedup keys ──> Outcome
    main, in input order: DuplicateIndex ── kept.jsonl | rejected.jsonl ── GateReport

Workers are forked processes; at most ``2 * workers`` chunks are in flight, so memory stays
flat however large the input is, and results are consumed in submission order, so the output
is the same for any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.config import GateConfig, LoraforgeConfig
from loraforge.errors import GateError
from loraforge.gate.checks import Check, build_checks
from loraforge.gate.dedup import DuplicateIndex, EvalOverlapCheck, MinHasher, exact_key, sample_features
from loraforge.gate.normalize import normalize
from loraforge.gate.readers import RawRecord, check_inputs, kind_of, read_records, sha256_of
from loraforge.gate.report import FileStats, GateReport
from loraforge.gate.verdict import Reason, Reject, Sample


_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


# json.dumps(obj, ensure_ascii=False, default=str) builds this encoder anew each call (~3 us)
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def jsonl_line(obj: Any) -> str:
    """One JSON line, readable (no ASCII escaping) but without the characters that
    ``str.splitlines`` and some JSONL readers treat as line breaks (they only occur inside strings)."""
    line = _ENCODER.encode(obj)
    if "\u2028" in line or "\u2029" in line or "\x85" in line:  # rare: skip the slow translate
        line = line.translate(_LINE_BREAKS)
    return line


@dataclass(slots=True)
class Rejected:
    code: Reason
    detail: str
    row: bytes = b""  # the rejected.jsonl line, encoded, set by the worker

    def __reduce__(self):  # pickled back from the workers: ~2.5x faster than the default
        return Rejected, (self.code, self.detail, self.row)


@dataclass(slots=True)
class Candidate:
    """Passed every per-sample check; duplicates are decided in the main process."""

    line: bytes  # the kept.jsonl line, encoded, ready to write
    exact: int | None
    near: tuple[list[int], bytes] | None  # LSH band keys and the 8-bit MinHash sketch

    def __reduce__(self):
        return Candidate, (self.line, self.exact, self.near)


Outcome = Rejected | Candidate


class SampleGate:
    """Everything that judges one sample on its own. One per worker process."""

    def __init__(self, cfg: GateConfig, tokenizer, paths: list[str], eval_overlap: EvalOverlapCheck | None):
        self.cfg = cfg
        self.paths = paths
        # where a record sits: a line in JSON files, a row in Parquet files
        self.locators = ["row" if kind_of(Path(p)) == "parquet" else "line" for p in paths]
        self.source_prefixes = [f'{{"file": {_json_str(p)}, "{where}": ' for p, where in zip(paths, self.locators)]
        self.checks: list[Check] = build_checks(cfg, tokenizer, eval_overlap)
        self.named_checks = [(check, check.code.value) for check in self.checks]  # an enum's .value costs ~1 us
        dedup = cfg.checks.dedup
        self.minhasher = MinHasher(dedup.num_perm, dedup.near_threshold, dedup.shingle_words) if dedup.near else None
        self.timings: Counter[str] = Counter()

    def source(self, record: RawRecord) -> dict[str, Any]:
        return {"file": self.paths[record.file], self.locators[record.file]: record.line}

    def source_json(self, record: RawRecord) -> str:
        """``json.dumps(self.source(record), ensure_ascii=False)``, from a per-file prefix."""
        return f"{self.source_prefixes[record.file]}{record.line}}}"

    def process(self, record: RawRecord) -> Outcome:
        value = record.value
        if record.text is not None:
            try:
                value = json.loads(record.text)
            except json.JSONDecodeError as exc:
                return Rejected(Reason.MALFORMED_JSON, f"line {record.line}, column {exc.colno}: {exc.msg}")
            except UnicodeDecodeError as exc:
                return Rejected(Reason.MALFORMED_JSON, f"line {record.line}: not valid UTF-8 at byte {exc.start}")
        messages = normalize(value)
        if isinstance(messages, Reject):
            return Rejected(messages.code, messages.detail)
        sample = Sample(messages, self.source(record))
        for check, name in self.named_checks:
            started = time.perf_counter()
            verdict = check(sample)
            self.timings[name] += time.perf_counter() - started
            if verdict is not None:
                return Rejected(verdict.code, verdict.detail)
        started = time.perf_counter()
        dedup = self.cfg.checks.dedup
        if dedup.exact or dedup.near:
            norm, _, hashes = sample_features(sample)
        exact = exact_key(norm) if dedup.exact else None
        near = self.minhasher.keys(hashes) if self.minhasher else None
        self.timings["dedup_keys"] += time.perf_counter() - started
        line = jsonl_line({"messages": sample.messages, "source": sample.source, **sample.meta})
        return Candidate((line + "\n").encode("utf-8"), exact, near)

    def process_chunk(self, chunk: list[RawRecord]) -> tuple[list[Outcome], dict[str, float]]:
        """Outcomes in order; a rejection carries its rejected.jsonl row, so the main process only writes it."""
        self.timings.clear()
        outcomes = []
        for record in chunk:
            outcome = self.process(record)
            if isinstance(outcome, Rejected):
                parsed = outcome.code is not Reason.MALFORMED_JSON
                outcome.row = rejected_row(outcome.code, outcome.detail, self.source_json(record), record, parsed)
            outcomes.append(outcome)
        return outcomes, dict(self.timings)


# The worker's SampleGate: set in the parent before the pool forks, inherited by every worker.
_WORKER_GATE: SampleGate | None = None


def _work(chunk: list[RawRecord]) -> tuple[list[Outcome], dict[str, float]]:
    assert _WORKER_GATE is not None
    return _WORKER_GATE.process_chunk(chunk)


def _chunks(paths: list[Path], size: int, progress) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for index, path in enumerate(paths):
        for record in read_records(path, index, progress):
            chunk.append(record)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


_json_str = json.encoder.encode_basestring  # a JSON string as json.dumps(..., ensure_ascii=False) writes it


def rejected_row(reason: Reason, detail: str, source_json: str, record: RawRecord, parsed: bool) -> bytes:
    """The rejected.jsonl line of ``record``, encoded: reason, detail, source (as JSON) and what it held.

    ``parsed``: the record's line decoded as JSON (in a worker), so the line itself is put in
    verbatim as the "record" value when it is plain UTF-8 (it then decodes to the same record),
    instead of decoding and re-encoding it (~60 us a row in the main process)."""
    line = (
        f'{{"reason": "{reason.value}", "detail": {_json_str(detail)}, "source": {source_json}, '
        f"{_original_member(record, parsed)}}}"
    )
    if "\u2028" in line or "\u2029" in line or "\x85" in line:  # rare: skip the slow translate
        line = line.translate(_LINE_BREAKS)
    return (line + "\n").encode("utf-8")


def _original_member(record: RawRecord, parsed: bool) -> str:
    """``"record": <the input record>``, or ``"raw": <the line>`` if it does not decode."""
    if record.text is None:
        return '"record": ' + _ENCODER.encode(record.value)
    if parsed and isinstance(record.text, bytes):
        try:
            raw = record.text.decode("utf-8")  # strict: json.loads would also take UTF-16/32 and surrogates
        except UnicodeDecodeError:
            raw = ""
        if raw and raw[0] != "\ufeff" and "\r" not in raw:  # a JSON space, but a line break to splitlines
            return '"record": ' + raw
    raw = record.text.decode("utf-8", errors="replace") if isinstance(record.text, bytes) else record.text
    try:
        member = {"record": json.loads(raw)}
    except json.JSONDecodeError:
        member = {"raw": raw}
    return _ENCODER.encode(member)[1:-1]


def _load_eval(files: list[Path], n: int) -> EvalOverlapCheck | None:
    if not files:
        return None
    check_inputs(files)
    conversations = []
    for index, path in enumerate(files):
        for record in read_records(path, index):
            try:
                value = json.loads(record.text) if record.text is not None else record.value
            except json.JSONDecodeError:
                continue
            messages = normalize(value)
            if not isinstance(messages, Reject):
                conversations.append(messages)
    return EvalOverlapCheck(conversations, n)


class _Outputs:
    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.kept_path, self.rejected_path = out_dir / "kept.jsonl", out_dir / "rejected.jsonl"
        # binary: the workers send their lines encoded; large buffers: fewer write calls
        self.kept = open(self.kept_path, "wb", buffering=1 << 20)
        self.rejected = open(self.rejected_path, "wb", buffering=1 << 20)

    def close(self) -> None:
        self.kept.close()
        self.rejected.close()


def run_gate(
    inputs: list[Path | str],
    out_dir: Path | str,
    config: LoraforgeConfig | None = None,
    tokenizer=None,
    show_progress: bool = False,
) -> GateReport:
    """Gate ``inputs`` into ``out_dir`` (kept.jsonl, rejected.jsonl, report.json); return the report.

    ``tokenizer`` defaults to the one of ``config.model.name`` (the embedded default).
    """
    global _WORKER_GATE
    config = config or LoraforgeConfig()
    cfg = config.gate
    paths = [Path(p) for p in inputs]
    if not paths:
        raise GateError("no input files given: pass one or more .jsonl, .json or .parquet files")
    check_inputs(paths)
    started = time.perf_counter()
    if tokenizer is None:
        from loraforge.models import load_tokenizer

        tokenizer = load_tokenizer(config.model.name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
    eval_overlap = _load_eval(cfg.checks.eval_overlap.files, cfg.checks.eval_overlap.ngram)
    names = [str(p) for p in paths]
    gate = SampleGate(cfg, tokenizer, names, eval_overlap)
    report = GateReport(
        model=config.model.name,
        max_seq_length=cfg.max_seq_length,
        thresholds=cfg.model_dump(mode="json"),
        files=[FileStats(path=name, sha256=sha256_of(p)) for name, p in zip(names, paths)],
    )
    setup_s = time.perf_counter() - started
    workers = cfg.workers or os.cpu_count() or 1
    dedup = cfg.checks.dedup
    duplicates = DuplicateIndex(dedup.exact, dedup.near, dedup.near_threshold, dedup.num_perm)
    kept_sources = _KeptSources()
    tally = _Tally(len(paths))
    timings: Counter[str] = Counter()
    outputs = _Outputs(Path(out_dir))
    progress = _progress(show_progress, sum(p.stat().st_size for p in paths))
    pool = None
    try:
        if workers > 1:
            _WORKER_GATE = gate
            pool = multiprocessing.get_context("fork").Pool(workers)
        with progress.bar if progress.bar else _null():
            in_flight: deque = deque()

            def drain_one():
                chunk, result = in_flight.popleft()
                outcomes, chunk_timings = result.get() if pool else result
                timings.update(chunk_timings)
                for record, outcome in zip(chunk, outcomes):
                    _record(report, tally, outputs, duplicates, kept_sources, gate, record, outcome)
                progress.records(len(chunk))

            for chunk in _chunks(paths, cfg.chunk_size, progress.bytes):
                in_flight.append((chunk, pool.apply_async(_work, (chunk,)) if pool else gate.process_chunk(chunk)))
                if len(in_flight) >= 2 * workers:
                    drain_one()
            while in_flight:
                drain_one()
    finally:
        if pool is not None:
            pool.terminate()
        _WORKER_GATE = None
        outputs.close()
    tally.apply(report)
    wall = time.perf_counter() - started
    report.timings = {
        "wall_s": round(wall, 3),
        "setup_s": round(setup_s, 3),
        "workers": workers,
        "samples_per_s": round(report.input / max(wall - setup_s, 1e-9), 1),
        **{f"check_{k}_s": round(v, 3) for k, v in sorted(timings.items())},
    }
    report.outputs = {"kept": str(outputs.kept_path), "rejected": str(outputs.rejected_path), "report": str(Path(out_dir) / "report.json")}
    if report.input != report.kept + report.rejected:  # the gate's promise; never expected to fire
        raise GateError(f"internal error: input {report.input} != kept {report.kept} + rejected {report.rejected}")
    (Path(out_dir) / "report.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return report


def _record(report, tally, outputs, duplicates, kept_sources, gate, record, outcome) -> None:
    tally.input[record.file] += 1
    if isinstance(outcome, Candidate):
        hit = duplicates.check(outcome.exact, outcome.near)
        if hit is None:
            duplicates.add(len(kept_sources), outcome.exact, outcome.near)
            kept_sources.append(record)
            outputs.kept.write(outcome.line)
            tally.kept[record.file] += 1
            return
        reason, ordinal, similarity = hit
        file, line = kept_sources[ordinal]
        what = "the same normalized text as" if reason is Reason.EXACT_DUPLICATE else f"~{similarity:.2f} Jaccard similar to"
        detail = f"{what} {gate.paths[file]}:{line}, which is kept"
        outcome = Rejected(reason, detail, rejected_row(reason, detail, gate.source_json(record), record, parsed=True))
    report.count(outcome.code.value, gate.source(record), outcome.detail)
    outputs.rejected.write(outcome.row)


class _Tally:
    """Per-file input and kept counts as plain ints (a pydantic attribute costs microseconds a write),
    moved into the report once at the end; rejected ones follow as input - kept."""

    def __init__(self, files: int):
        self.input, self.kept = [0] * files, [0] * files

    def apply(self, report: GateReport) -> None:
        for stats, n_input, n_kept in zip(report.files, self.input, self.kept):
            stats.input, stats.kept, stats.rejected = n_input, n_kept, n_input - n_kept
        report.input, report.kept = sum(self.input), sum(self.kept)


class _KeptSources:
    """Ordinal of a kept sample -> (file, line), in 12 bytes a sample instead of a dict."""

    def __init__(self):
        self.files, self.lines = array("I"), array("Q")

    def __len__(self) -> int:
        return len(self.files)

    def append(self, record: RawRecord) -> None:
        self.files.append(record.file)
        self.lines.append(record.line)

    def __getitem__(self, ordinal: int) -> tuple[int, int]:
        return self.files[ordinal], self.lines[ordinal]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class _Progress:
    bar: Any
    task: Any = None
    done: int = 0

    def bytes(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def records(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, description=f"gate: {self.done:,} records")


def _progress(show: bool, total_bytes: int) -> _Progress:
    if not show:
        return _Progress(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
    return _Progress(bar, bar.add_task("gate", total=total_bytes))
