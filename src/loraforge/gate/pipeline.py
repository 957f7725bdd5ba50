"""Run the gate: read -> normalize -> per-sample checks (workers) -> duplicates (in order) -> write.

Flow of one record::

    readers.read_records ──chunks──> a worker or the main process: SampleGate.process_chunk
        parse JSON ── normalize ── checks.* ── dedup keys ──> rejected row | candidate
    main, in input order: DuplicateIndex ── kept.jsonl | rejected.jsonl ── GateReport

``gate.workers`` processes check samples: ``workers - 1`` forked ones (``parallel.Workers``)
and the main process, which takes a chunk itself whenever the others have two queued. At most
``4 * workers`` chunks are held at a time, so memory stays flat however large the input is,
and results are consumed in submission order, so the output is the same for any number of
workers.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from loraforge.config import GateConfig, LoraforgeConfig
from loraforge.errors import GateError
from loraforge.gate.checks import Check, build_checks
from loraforge.gate.dedup import DuplicateIndex, EvalOverlapCheck, MinHasher, exact_key, sample_features
from loraforge.gate.normalize import normalize
from loraforge.gate.parallel import Workers
from loraforge.gate.readers import RawRecord, check_inputs, kind_of, read_records, sha256_of
from loraforge.gate.report import Example, FileStats, GateReport
from loraforge.gate.verdict import Reason, Reject, Sample


_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})
# the same three characters in UTF-8, and their escapes
_LINE_BREAK_BYTES = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


# json.dumps(obj, ensure_ascii=False, default=str) builds this encoder anew each call (~3 us)
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def jsonl_line(obj: Any) -> bytes:
    """One JSON line (with its newline, UTF-8), readable (no ASCII escaping) but without the
    characters that ``str.splitlines`` and some JSONL readers treat as line breaks (they only
    occur inside strings). Written by orjson: ~5 us a kept sample against the standard
    library's ~11 (the benchmark's records); for what the gate writes (strings, integers,
    lists and dicts of them) the value is the same, the spacing compact."""
    try:
        line = orjson.dumps(obj, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # what orjson does not write (an integer past 64 bits, a non-str key)
        line = (_ENCODER.encode(obj) + "\n").encode("utf-8")
    for char, escaped in _LINE_BREAK_BYTES:
        if char in line:  # rare: skip the replace
            line = line.replace(char, escaped)
    return line


# orjson reads an integer past 64 bits as a float, the standard library keeps it exact: a line
# with a run of 19 digits or more goes to the standard library. Digits kept, the rest blanked,
# then one find: ~1.8 us a benchmark line, against ~19 for re's \d{19}.
_DIGITS = bytes(48 if 48 <= c < 58 else 32 for c in range(256))  # every digit -> "0", the rest -> " "
_LONG_NUMBER = b"0" * 19


def loads(text: bytes | str) -> Any:
    """``json.loads(text)``, the same value, through orjson where it can (~2.6 us a benchmark
    record against ~11). Whatever orjson refuses (NaN, a byte order mark, UTF-16, lone
    surrogates, malformed input) goes to the standard library, which decides and words the error."""
    if text.__class__ is bytes and _LONG_NUMBER not in text.translate(_DIGITS):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


@dataclass(slots=True)
class Rejected:
    code: Reason
    detail: str


@dataclass(slots=True)
class Candidate:
    """Passed every per-sample check; duplicates are decided in the main process."""

    line: bytes  # the kept.jsonl line, encoded, ready to write
    exact: int | None
    near: tuple[list[int], bytes] | None  # LSH band keys and the 8-bit MinHash sketch


Outcome = Rejected | Candidate

# What a worker sends back for one record: the rejected.jsonl row of a rejection, or for a
# candidate (kept line, exact key, near keys, the tail of the row it gets if it turns out a
# duplicate). Plain bytes and tuples: the pipe pickles them in C, with no Python call a record.
Sent = bytes | tuple[bytes, int | None, tuple[list[int], bytes] | None, bytes]

EXAMPLES = 5  # rejected examples kept per reason in the report


@dataclass
class ChunkResult:
    sent: list[Sent]  # one per record, in order
    reasons: dict[str, int]  # the chunk's rejections by reason (duplicates are the main process's)
    examples: dict[str, list[tuple[dict[str, Any], str]]]  # the first few per reason: (source, detail)
    timings: dict[str, float]


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
                value = loads(record.text)
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
        return Candidate(jsonl_line({"messages": sample.messages, "source": sample.source, **sample.meta}), exact, near)

    def process_chunk(self, chunk: list[RawRecord]) -> ChunkResult:
        """What the main process needs of each record, in order: a rejection comes as its
        rejected.jsonl row (counted here), a candidate with its row's tail, so the main process
        only decides duplicates and writes."""
        self.timings.clear()
        result = ChunkResult([], {}, {}, {})
        sent, reasons, examples = result.sent, result.reasons, result.examples
        for record in chunk:
            outcome = self.process(record)
            source_json = self.source_json(record)
            if outcome.__class__ is Rejected:
                _tally(reasons, examples, outcome.code.value, self, record, outcome.detail)
                parsed = outcome.code is not Reason.MALFORMED_JSON
                sent.append(rejected_row(outcome.code, outcome.detail, source_json, record, parsed))
            else:
                sent.append((outcome.line, outcome.exact, outcome.near, _row_tail(source_json, record, parsed=True)))
        result.timings = dict(self.timings)
        return result


def _tally(reasons: dict[str, int], examples: dict, code: str, gate: SampleGate, record: RawRecord, detail: str) -> None:
    """Count a rejection, and keep it as an example while its reason has fewer than ``EXAMPLES``."""
    reasons[code] = reasons.get(code, 0) + 1
    shown = examples.setdefault(code, [])
    if len(shown) < EXAMPLES:
        shown.append((gate.source(record), detail))


def _chunks(paths: list[Path], size: int, progress) -> Iterator[tuple[int, list[RawRecord]]]:
    """(file index, records) of at most ``size`` records, all of one file."""
    for index, path in enumerate(paths):
        chunk: list[RawRecord] = []
        for record in read_records(path, index, progress):
            chunk.append(record)
            if len(chunk) >= size:
                yield index, chunk
                chunk = []
        if chunk:
            yield index, chunk


_json_str = json.encoder.encode_basestring  # a JSON string as json.dumps(..., ensure_ascii=False) writes it


def rejected_row(reason: Reason, detail: str, source_json: str, record: RawRecord, parsed: bool) -> bytes:
    """The rejected.jsonl line of ``record``, encoded: reason, detail, source (as JSON) and what it held.

    ``parsed``: the record's line decoded as JSON (in a worker), so the line itself is put in
    verbatim as the "record" value when it is plain UTF-8 (it then decodes to the same record),
    instead of decoding and re-encoding it."""
    return _row_head(reason.value, detail) + _row_tail(source_json, record, parsed)


def _row_head(code: str, detail: str) -> bytes:
    """``{"reason": ..., "detail": ...`` of a rejected row (the main process makes the heads of
    duplicates, whose tails the workers made)."""
    return _escape_line_breaks(f'{{"reason": "{code}", "detail": {_json_str(detail)}').encode("utf-8")


def _row_tail(source_json: str, record: RawRecord, parsed: bool) -> bytes:
    """``, "source": ..., "record": ...}`` and the newline: the rest of a rejected row."""
    return b", \"source\": " + _escape_line_breaks(source_json).encode("utf-8") + b", " + _original_member(record, parsed) + b"}\n"


def _escape_line_breaks(text: str) -> str:
    if "\u2028" in text or "\u2029" in text or "\x85" in text:  # rare: skip the slow translate
        return text.translate(_LINE_BREAKS)
    return text


def _original_member(record: RawRecord, parsed: bool) -> bytes:
    """``"record": <the input record>``, or ``"raw": <the line>`` if it does not decode; encoded."""
    text = record.text
    if parsed and isinstance(text, bytes) and text and b"\r" not in text:  # \r: a line break to splitlines
        if text.isascii():  # most lines: valid UTF-8 without a BOM or the line breaks below
            return b'"record": ' + text
        try:
            raw = text.decode("utf-8")  # strict: json.loads would also take UTF-16/32 and surrogates
        except UnicodeDecodeError:
            raw = ""
        if raw and raw[0] != "\ufeff":  # a BOM is no JSON space
            escaped = _escape_line_breaks(raw)
            return b'"record": ' + (text if escaped is raw else escaped.encode("utf-8"))
    if text is None:
        member = '"record": ' + _ENCODER.encode(record.value)
    else:
        raw = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        try:
            member = _ENCODER.encode({"record": json.loads(raw)})[1:-1]
        except json.JSONDecodeError:
            member = _ENCODER.encode({"raw": raw})[1:-1]
    return _escape_line_breaks(member).encode("utf-8")


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
    main = _MainSide(DuplicateIndex(dedup.exact, dedup.near, dedup.near_threshold, dedup.num_perm), gate, Path(out_dir), len(paths))
    progress = _progress(show_progress, sum(p.stat().st_size for p in paths))
    pool = None
    try:
        if workers > 1:  # forked before the progress bar's thread starts
            pool = Workers(workers - 1, gate.process_chunk)  # the main process checks samples too
        with progress.bar if progress.bar else _null():
            _drive(_chunks(paths, cfg.chunk_size, progress.bytes), gate, pool, main, progress)
    finally:
        if pool is not None:
            pool.close()
        main.close()
    main.apply(report)
    wall = time.perf_counter() - started
    report.timings = {
        "wall_s": round(wall, 3),
        "setup_s": round(setup_s, 3),
        "workers": workers,
        "samples_per_s": round(report.input / max(wall - setup_s, 1e-9), 1),
        **{f"check_{k}_s": round(v, 3) for k, v in sorted(main.timings.items())},
    }
    report.outputs = {"kept": str(main.kept_path), "rejected": str(main.rejected_path), "report": str(Path(out_dir) / "report.json")}
    if report.input != report.kept + report.rejected:  # the gate's promise; never expected to fire
        raise GateError(f"internal error: input {report.input} != kept {report.kept} + rejected {report.rejected}")
    (Path(out_dir) / "report.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return report


def _drive(chunks: Iterator[tuple[int, list[RawRecord]]], gate: SampleGate, pool: Workers | None, main: "_MainSide", progress) -> None:
    """Check every chunk, in a worker or here, and hand the results to ``main`` in input order.

    A chunk goes to the least busy worker while it has fewer than two queued, else the main
    process checks it itself (so no core waits while another has work); results are taken in
    submission order, so the output is the same for any number of workers. At most
    ``4 x (pool workers + 1)`` chunks are held at a time."""
    in_flight: deque = deque()  # (file, chunk, worker index or its ChunkResult), in input order
    held = 4 * (len(pool.pending) + 1 if pool else 1)

    def take_one() -> None:
        file, chunk, result = in_flight.popleft()
        if result.__class__ is int:
            result = pool.take(result)
        main.absorb(file, chunk, result)
        progress.records(len(chunk))

    for file, chunk in chunks:
        worker = min(range(len(pool.pending)), key=pool.pending.__getitem__) if pool else None
        if worker is not None and pool.pending[worker] < 2:
            pool.submit(worker, chunk)
            in_flight.append((file, chunk, worker))
        else:
            in_flight.append((file, chunk, gate.process_chunk(chunk)))
        while in_flight and (in_flight[0][2].__class__ is ChunkResult or pool.ready(in_flight[0][2])):
            take_one()
        if len(in_flight) >= held:
            take_one()
    while in_flight:
        take_one()


class _MainSide:
    """The main process's share, in input order: duplicates, the output files and the counts.

    Per record it only looks up duplicates and writes bytes; counts are plain ints and dicts
    (a pydantic attribute costs microseconds a write), moved into the report once at the end."""

    def __init__(self, duplicates: DuplicateIndex, gate: SampleGate, out_dir: Path, files: int):
        self.duplicates, self.gate = duplicates, gate
        out_dir.mkdir(parents=True, exist_ok=True)
        self.kept_path, self.rejected_path = out_dir / "kept.jsonl", out_dir / "rejected.jsonl"
        # binary: the workers send their lines encoded; large buffers: fewer write calls
        self.kept = open(self.kept_path, "wb", buffering=1 << 20)
        self.rejected = open(self.rejected_path, "wb", buffering=1 << 20)
        self.kept_sources = _KeptSources()
        self.input, self.kept_per_file = [0] * files, [0] * files
        self.reasons: dict[str, int] = {}
        self.examples: dict[str, list[tuple[dict[str, Any], str]]] = {}
        self.timings: Counter[str] = Counter()

    def absorb(self, file: int, chunk: list[RawRecord], result: ChunkResult) -> None:
        self.timings.update(result.timings)
        for code, n in result.reasons.items():
            self.reasons[code] = self.reasons.get(code, 0) + n
        for code, shown in result.examples.items():
            mine = self.examples.setdefault(code, [])
            mine.extend(shown[: EXAMPLES - len(mine)])
        check, add, kept_sources = self.duplicates.check, self.duplicates.add, self.kept_sources
        write_kept, write_rejected = self.kept.write, self.rejected.write
        kept = 0
        for record, sent in zip(chunk, result.sent):
            if sent.__class__ is bytes:  # rejected in the worker, already counted
                write_rejected(sent)
                continue
            line, exact, near, tail = sent
            hit = check(exact, near)
            if hit is None:
                add(len(kept_sources), exact, near)
                kept_sources.append(record)
                write_kept(line)
                kept += 1
            else:
                write_rejected(self._duplicate_head(record, hit) + tail)
        self.input[file] += len(chunk)
        self.kept_per_file[file] += kept

    def _duplicate_head(self, record: RawRecord, hit: tuple[Reason, int, float]) -> bytes:
        reason, ordinal, similarity = hit
        file, line = self.kept_sources[ordinal]
        what = "the same normalized text as" if reason is Reason.EXACT_DUPLICATE else f"~{similarity:.2f} Jaccard similar to"
        detail = f"{what} {self.gate.paths[file]}:{line}, which is kept"
        _tally(self.reasons, self.examples, reason.value, self.gate, record, detail)
        return _row_head(reason.value, detail)

    def close(self) -> None:
        self.kept.close()
        self.rejected.close()

    def apply(self, report: GateReport) -> None:
        for stats, n_input, n_kept in zip(report.files, self.input, self.kept_per_file):
            stats.input, stats.kept, stats.rejected = n_input, n_kept, n_input - n_kept
        report.input, report.kept = sum(self.input), sum(self.kept_per_file)
        report.reasons = dict(self.reasons)  # in the order first seen (chunk by chunk)
        report.rejected = sum(self.reasons.values())
        report.examples = {code: [Example(source=source, detail=detail) for source, detail in self.examples[code]] for code in report.reasons}


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
