"""The C extension (``loraforge.gate._native``) gives exactly what the pure-Python code gives.

Each test computes the same thing twice: with the extension, and with it switched off (the
modules' ``_native`` set to None, the path an install without a compiler takes).
"""

import contextlib
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.config import RepetitionConfig, load_config
from loraforge.gate import dedup, pii, repetition
from loraforge.models import chat
from loraforge.gate.pipeline import RawRecord, rejected_row
from loraforge.gate.verdict import Reason

native = pytest.importorskip("loraforge.gate._native", reason="the C extension is not built")

PIECES = ["the", "a", "of", "cat", "I", "hope", "this", "helps", ".", " ", "\n", "\n\n", "!!", "é", "Σ", "İ", "_", "x1",
          "2020", "=", "| a |", "I hope this helps."]
junk = st.lists(st.sampled_from(PIECES), max_size=300).map("".join) | st.text(max_size=200)


class _PythonOnly:
    """Switches the extension off in the gate's modules and in token counters made while in use."""

    def __enter__(self):
        self.saved = dedup._native, repetition._native, pii._native, chat._chunk_table
        dedup._native = repetition._native = pii._native = None
        chat._chunk_table = lambda: None

    def __exit__(self, *exc):
        dedup._native, repetition._native, pii._native, chat._chunk_table = self.saved


def python_only():
    return _PythonOnly()


def _real_texts(alpaca_file, sharegpt_file) -> list[str]:
    texts = [r["output"] for r in json.loads(alpaca_file.read_text())]
    texts += [t["value"] for c in json.loads(sharegpt_file.read_text()) for t in c["conversations"]]
    looped = [t + " " + (t.split(".")[0] + ". ") * 3 for t in texts[:500]]
    return texts + looped


def _screen_values(screen: repetition._Screen, words: list[str]) -> list:
    values = [screen.repeated, screen.top_word_chars, screen.total_chars, screen.repeated_chars()]
    for n in range(1, 11):
        values.append(screen.repeats(n))
        if screen.total_chars:
            values += [screen.top_ngram_char_frac(n), screen.dup_ngram_char_frac(n)]
    for min_repeats in (2, 3, 4):
        for max_period in (1, 3, 32):
            values.append(screen.longest_loop(min_repeats, max_period, 1))
    return values


def _assert_screens_agree(text: str) -> None:
    words = repetition.words_of(text)
    expected = _screen_values(repetition._Screen(words), words)
    # at min_span 1 the Python search's repeated-n-gram shortcut is the repeated-word test, which
    # the C search passes through as well (no word repeats: no loop)
    assert _screen_values(repetition._NativeScreen(words), words) == expected


@settings(max_examples=300, deadline=None)
@given(text=junk)
def test_screen_in_c_equals_python_on_junk(text):
    _assert_screens_agree(text)


def test_screen_in_c_equals_python_on_real_data(alpaca_file, sharegpt_file):
    for text in _real_texts(alpaca_file, sharegpt_file):
        _assert_screens_agree(text)


def test_longest_loop_in_c_equals_python_where_loops_exist(alpaca_file):
    texts = [r["output"] for r in json.loads(alpaca_file.read_text())][:300]
    rng = random.Random(1)
    for text in texts:
        words = text.split()
        cut = rng.randint(0, len(words))
        phrase = words[cut : cut + rng.randint(1, 6)] or ["again"]
        looped = " ".join(words[:cut] + phrase * rng.randint(2, 6) + words[cut:])
        loop_words = repetition.words_of(looped)
        for min_repeats in (2, 3):
            want = repetition.longest_loop(loop_words, min_repeats, 32, 1)
            assert repetition._NativeScreen(loop_words).longest_loop(min_repeats, 32, 1) == want


def test_find_repetition_with_and_without_c(alpaca_file, sharegpt_file):
    loose = RepetitionConfig(min_words=5, loop_min_words=4, loop_repeats=2, min_lines=2, char_run=6)
    texts = _real_texts(alpaca_file, sharegpt_file)
    for cfg in (RepetitionConfig(), loose):
        fast = [repetition.find_repetition(t, cfg) for t in texts]
        with python_only():
            slow = [repetition.find_repetition(t, cfg) for t in texts]
        assert fast == slow
        assert fast == [repetition.find_repetition_exact(t, cfg) for t in texts]


@settings(max_examples=200, deadline=None)
@given(text=junk)
def test_word_and_ngram_hashes_equal(text):
    words = dedup.words_of(text) or ["x"]
    hashes = dedup.word_hashes(words)
    with python_only():
        assert hashes.tolist() == dedup.word_hashes(words).tolist()
    for n in range(1, 21):
        fast = dedup.ngram_hashes(hashes, n)
        with python_only():
            assert fast.tolist() == dedup.ngram_hashes(hashes, n).tolist()


def test_minhash_keys_equal(alpaca_file):
    hasher = dedup.MinHasher(128, 0.85, 5)
    odd = dedup.MinHasher(30, 0.7, 3)  # permutations not a multiple of four
    texts = [r["output"] for r in json.loads(alpaca_file.read_text())] + ["", "one", "two words"]
    for text in texts:
        hashes = dedup.word_hashes(dedup.words_of(text))
        for h in (hasher, odd):
            fast = h.keys(hashes), h.signature(hashes).tolist()
            with python_only():
                assert fast == (h.keys(hashes), h.signature(hashes).tolist())


def test_key_index_and_sketches_equal():
    rng = random.Random(2)
    keys = [rng.getrandbits(64) for _ in range(5000)] + [0, 1, 0]
    probe = keys[::7] + [rng.getrandbits(64) for _ in range(500)]
    indexes = []
    for use_c in (True, False):
        ctx = python_only() if not use_c else contextlib.nullcontext()
        with ctx:
            index = dedup.KeyIndex(capacity=16)
            for value, key in enumerate(keys[:3000]):
                index.add(key, value)
            for value in range(3000, len(keys), 8):  # eight keys a sample, as the LSH bands
                index.add_all(keys[value : value + 8] + keys[value - 3000 : value - 2999], value)
            indexes.append((index.size, index.get_all(probe), [index.get(key) for key in probe]))
    assert indexes[0] == indexes[1]

    sketches = np.frombuffer(bytes(rng.getrandbits(8) for _ in range(128 * 10)), dtype=np.uint8).reshape(10, 128)
    duplicates = dedup.DuplicateIndex(True, True, 0.85)
    duplicates.sketches = sketches.copy()
    for row in range(10):
        sketch = bytes(sketches[(row + 1) % 10][:64]) + bytes(sketches[row][64:])
        fast = duplicates.jaccard(row, sketch)
        with python_only():
            assert fast == duplicates.jaccard(row, sketch)


def test_gate_outputs_equal_with_and_without_c(tmp_path, tiny_tokenizer, alpaca_file):
    from loraforge.gate import run_gate

    records = json.loads(alpaca_file.read_text())[:300]
    data = tmp_path / "in.jsonl"
    with open(data, "w", encoding="utf-8") as out:
        for k in range(3):  # near duplicates: the same records with a variant marker
            for r in records:
                out.write(json.dumps({**r, "instruction": r["instruction"] + (f" (variant {k})" if k else "")}) + "\n")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n" for r in records[:10]))
    cfg = load_config(overrides={"gate.workers": 1, "gate.checks.pii.mode": "flag", "gate.checks.eval_overlap.files": [str(eval_file)]})
    results = []
    for use_c in (True, False):
        with contextlib.nullcontext() if use_c else python_only():
            out = tmp_path / f"out_{use_c}"
            report = run_gate([data], out, cfg, tokenizer=tiny_tokenizer)
            results.append(((out / "kept.jsonl").read_bytes(), (out / "rejected.jsonl").read_bytes(), report.reasons))
    assert results[0] == results[1]
    assert results[0][2].get("near_duplicate", 0) > 0 and results[0][2].get("eval_overlap", 0) > 0


@pytest.mark.parametrize(
    "line",
    [
        b'{"prompt": "caf\\u00e9", "completion": "x"}',
        '{"prompt": "café \u2028 line \u2029 para \x85 next", "completion": "x"}'.encode(),
        b'  {"prompt": "a",   "completion": "b", "prompt": "last wins"}  ',
        b'{"n": NaN, "big": 1e400, "s": "\\ud800"}',
        b"[1, 2, 3]",
        b'{"prompt": "a",\r "completion": "b"}',
    ],
)
def test_rejected_row_keeps_the_record_verbatim_and_decodable(line):
    source = json.dumps({"file": "f.jsonl", "line": 3})
    row = rejected_row(Reason.NEAR_DUPLICATE, "detail \u2028", source, RawRecord(0, 3, line), parsed=True)
    text = row.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1
    assert not any(c in text for c in "\u2028\u2029\x85\r")
    decoded = json.loads(text)
    assert decoded["reason"] == "near_duplicate" and decoded["detail"] == "detail \u2028"
    assert decoded["source"] == {"file": "f.jsonl", "line": 3}
    assert json.dumps(decoded["record"]) == json.dumps(json.loads(line))


@pytest.mark.parametrize(
    ("line", "parsed", "member"),
    [
        (b"not json", False, {"raw": "not json"}),
        (b'{"a": "\xff"}', False, {"record": {"a": "\ufffd"}}),  # as before: decoded with replacement
        (b"\xef\xbb\xbf{}", True, {"raw": "\ufeff{}"}),  # json.loads(bytes) takes a BOM; JSON text may not hold one
    ],
)
def test_rejected_row_of_a_line_that_does_not_decode_alone(line, parsed, member):
    row = json.loads(rejected_row(Reason.MALFORMED_JSON, "d", '{"file": "f", "line": 1}', RawRecord(0, 1, line), parsed))
    assert {k: v for k, v in row.items() if k in ("record", "raw")} == member


def test_token_counts_through_the_chunk_table_equal_the_dict_path(embedded_tokenizer, alpaca_file, sharegpt_file):
    from loraforge.gate.normalize import normalize
    from loraforge.models.chat import ChatRenderer, TokenCounter

    renderer = ChatRenderer(embedded_tokenizer)
    records = json.loads(alpaca_file.read_text()) + json.loads(sharegpt_file.read_text())
    texts = [renderer.render(normalize(r)) for r in records]
    texts += [t.replace(" ", " é ", 3) + " 日本 x" for t in texts[:200]]  # chunks of wider string kinds
    fast, slow = TokenCounter(embedded_tokenizer, verify_first=0), TokenCounter(embedded_tokenizer, verify_first=0)
    slow.chunk_table = None
    assert fast.chunk_table is not None
    small = TokenCounter(embedded_tokenizer, verify_first=0, max_cache=50)  # cleared over and over
    for text in texts + texts[:100]:
        assert fast(text) == slow(text) == small(text)
    assert len(fast.chunk_table) > 1000


DIGITISH = ["1", "12", "123", "1234", "٣", "۴۵۶", "１２３", "߀", "²", "½", ".", "-", " ", "+", ":", "a", "F", "é", "@", "sk-",
            "192.168.0.1", "٢٠٢٠.١.٥", "+٩٧١", "fe80:0:0:0:0:0:0:1", "日本", "\n", "AKIA", "AIza", "xox", "hf_", "gh", "p_",
            "g", "h", "_", "ｆ", "::", "0", "ab:", "k-"]


@settings(max_examples=400, deadline=None)
@given(text=st.lists(st.sampled_from(DIGITISH), max_size=40).map("".join) | st.text(max_size=80))
def test_pii_prefilter_in_one_pass_equals_the_regex_ones(text):
    mask = native.pii_prefilter(text)
    for kind, bit in pii._KIND_BITS.items():
        assert bool(mask & bit) == (pii._PREFILTERS[kind].search(text) is not None), kind
    found = pii.find_pii(text, list(pii.PATTERNS))
    with python_only():
        assert found == pii.find_pii(text, list(pii.PATTERNS))


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "!", "-", "é", " ", "\n", "日", "x" * 5, "!" * 7]), max_size=60).map("".join),
       length=st.integers(2, 12))
def test_char_run_scan_equals_the_regex(text, length):
    found = repetition.char_run(text, length)
    with python_only():
        expected = repetition.char_run(text, length)
    assert (found and found.span()) == (expected and expected.span())


def test_eval_overlap_search_equals_the_set_and_sorted_search(alpaca_file):
    from loraforge.gate.normalize import normalize
    from loraforge.gate.verdict import Sample

    records = json.loads(alpaca_file.read_text())
    check = dedup.EvalOverlapCheck([normalize(r) for r in records[:40]], 13)
    for r in records[:400]:
        fast = check(Sample(normalize(r), {}))
        with python_only():
            assert fast == check(Sample(normalize(r), {}))


def test_short_word_hashes_are_xxh3():
    import xxhash

    rng = random.Random(3)
    alphabet = "abcxyz019_éß日本\U0001f600"
    words = ["".join(rng.choice(alphabet) for _ in range(n)) for n in range(0, 24) for _ in range(100)]
    got = dedup.word_hashes(words).tolist()
    assert got == [xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in words]


LINE_PIECES = ["a", "B", "cd", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f",
               "the same line here", "The  Same line HERE", "x y z\n"]


@settings(max_examples=400, deadline=None)
@given(text=st.lists(st.sampled_from(LINE_PIECES), max_size=60).map("".join) | st.text(alphabet=st.characters(max_codepoint=127)))
def test_duplicate_lines_counted_in_c_equal_python(text):
    fast = repetition.dup_line_frac(text)
    with python_only():
        assert fast == repetition.dup_line_frac(text)


@settings(max_examples=400, deadline=None)
@given(text=junk | st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=100))
def test_word_runs_in_c_equal_the_regex(text):
    import re

    assert repetition.word_runs(text) == re.findall(r"\w+", text)
    fast = repetition.words_of(text)
    with python_only():
        assert fast == repetition.words_of(text)


@settings(max_examples=500, deadline=None)
@given(text=st.lists(st.sampled_from([" ", "a", "é", "\t", "\n", "\u00a0", "\u2003", "\u3000", "\x85", "\x1c", "\u200b", "x y"]),
                     max_size=30).map("".join))
def test_chunk_table_refuses_exactly_the_texts_of_the_whitespace_path(text):
    import re

    from loraforge.models.chat import _WHITE_SPACE

    needs_segments = text.endswith(" ") or re.search(f" [{_WHITE_SPACE}]", text) is not None
    assert (native.ChunkTable().count(text) is None) == needs_segments


WS_PIECES = [" ", "  ", "   ", " \n", "\n", "\n\n", "\t", " \t", "\r\n", "\u00a0", " \u00a0", "\u3000", " \u3000", "\u2003",
             "\x85", "\x1c", "\u200b", "a", "word", " word", "'s", "12", "é", "日本", "\U0001f600", "!", "...", "-"]
ws_junk = st.lists(st.sampled_from(WS_PIECES), max_size=50).map("".join) | st.text(max_size=120)


@settings(max_examples=500, deadline=None)
@given(text=ws_junk)
def test_segments_cut_in_c_equal_the_regex(text):
    # an empty table knows no segment: it hands every one back, in order
    assert native.ChunkTable().count_segments(text) == (0, chat._segments_regex().findall(text))


@pytest.fixture(scope="module")
def counters(embedded_tokenizer):
    """Token counters with the C tables and without them (python_only), kept across examples."""
    fast = chat.TokenCounter(embedded_tokenizer, verify_first=0)
    with python_only():
        slow = chat.TokenCounter(embedded_tokenizer, verify_first=0)
    assert fast.segment_table is not None and slow.chunk_table is None and slow.segment_table is None
    return fast, slow


WS_TEXTS = ["two  spaces", "line \nbreak", "trailing ", "trailing  ", " ", "  ", "\t tab\t", "a \tb", "wide\u3000space",
            "nb\u00a0sp", "x \u00a0y", "x \u3000 y", "end \u3000", "\n\n  code:\n    indent  \n", "日本  語 ", "é  é\t\té ",
            "<|im_start|>user\nhi  there <|im_end|>\n<|im_start|>assistant\n ok \n<|im_end|>"]


def test_segment_counts_in_c_equal_python_and_full_encoding(counters):
    fast, slow = counters
    rng = random.Random(4)
    texts = WS_TEXTS + ["".join(rng.choices(WS_PIECES, k=rng.randint(1, 80))) for _ in range(2000)]
    for text in texts + texts[:50]:  # the second time from the tables
        assert fast(text) == slow(text) == fast.exact(text), repr(text)
    assert len(fast.segment_table) > 100


@settings(max_examples=300, deadline=None)
@given(text=ws_junk | junk)
def test_segment_counts_in_c_equal_python_on_junk(counters, text):
    fast, slow = counters
    assert fast(text) == slow(text) == fast.exact(text)


def test_segment_table_counts_after_clearing(embedded_tokenizer):
    small = chat.TokenCounter(embedded_tokenizer, verify_first=0, max_cache=20)  # cleared over and over
    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choices(WS_PIECES, k=rng.randint(1, 60)))
        assert small(text) == small.exact(text), repr(text)
    assert len(small.segment_table) < 200  # bounded: cleared at 20, then one text's segments


def _near_queries(rng: random.Random, num_perm: int, kept: int, queries: int):
    """Kept samples and queries: sketches mutated from a few bases (similarities spread from 0 to 1),
    band keys from a small pool (collisions, several bands naming the same kept sample, keys 0 and 1)."""
    bases = [bytes(rng.getrandbits(8) for _ in range(num_perm)) for _ in range(4)]
    pool = [0, 1, *(rng.getrandbits(64) for _ in range(kept // 2))]

    def sample():
        base, keep = bytearray(rng.choice(bases)), rng.random()
        for p in range(num_perm):
            if rng.random() > keep:
                base[p] = rng.getrandbits(8)
        return [rng.choice(pool) for _ in range(rng.randint(0, 10))], bytes(base)

    return [sample() for _ in range(kept)], [sample() for _ in range(queries)]


def _check_both_ways(index: dedup.DuplicateIndex, near) -> tuple:
    fast = index.check(None, near)
    with python_only():
        slow = index.check(None, near)
    bits = [hit and (hit[1], float(hit[2]).hex()) for hit in (fast, slow)]  # numpy's float64 without C
    assert fast == slow and bits[0] == bits[1]  # the same hit, the same float to the last bit
    return fast


@pytest.mark.parametrize("num_perm", [16, 128])
def test_near_check_in_c_equals_python(num_perm):
    rng = random.Random(num_perm)
    kept, queries = _near_queries(rng, num_perm, 1500, 1500)  # past the 1024 first sketch rows: the matrix grows
    for threshold in (0.85, 0.5, 0.1):
        index = dedup.DuplicateIndex(False, True, threshold, num_perm)
        assert all(_check_both_ways(index, q) is None for q in queries[:20])  # empty index
        expected = np.zeros((len(kept), num_perm), dtype=np.uint8)
        hits = 0
        for ordinal, (bands, sketch) in enumerate(kept):
            hits += _check_both_ways(index, (bands, sketch)) is not None
            index.add(ordinal, None, (bands, sketch))
            expected[ordinal] = np.frombuffer(sketch, dtype=np.uint8)
        assert np.array_equal(index.sketches[: len(kept)], expected)
        hits += sum(_check_both_ways(index, q) is not None for q in queries)
        assert 0 < hits < len(kept) + len(queries)


def test_near_check_at_the_threshold():
    rng = random.Random(7)
    base = bytes(rng.getrandbits(8) for _ in range(128))
    index = dedup.DuplicateIndex(False, True, 0.85)
    # kept samples 0..3 equal the query in 0, 100, 110 and 120 of 128 bytes; bands 10..13 name them,
    # band 20 names sample 1 again
    for ordinal, equal in enumerate([0, 100, 110, 120]):
        sketch = base[:equal] + bytes((b + 1) % 256 for b in base[equal:])
        index.add(ordinal, None, ([10 + ordinal, 20], sketch))
    for equal in (0, 100, 110, 120, 127, 128):
        at = max(0.0, (equal / 128 - 1 / 256) / (1 - 1 / 256))
        for threshold in (at, np.nextafter(at, 0.0), np.nextafter(at, 2.0), 0.0, 1.0):
            index.threshold = float(threshold)
            for bands in ([10, 11, 12, 13], [13, 12, 11, 10], [20, 11, 11, 20, 12], [11] * 80 + [13], [99], []):
                _check_both_ways(index, (bands, base))
    index.threshold = 0.0  # the first candidate, even at similarity 0.0
    assert _check_both_ways(index, ([10, 13], base)) == (Reason.NEAR_DUPLICATE, 0, 0.0)


def test_sketch_rows_follow_a_matrix_replaced_from_outside():
    index = dedup.DuplicateIndex(False, True, 0.85, num_perm=16)
    index.add(0, None, ([1], bytes(range(16))))
    index.sketches = np.zeros((4, 16), dtype=np.uint8)
    index.add(2, None, ([2], bytes(range(16, 32))))
    assert index.sketches[2].tobytes() == bytes(range(16, 32))
    assert _check_both_ways(index, ([2], bytes(range(16, 32)))) == (Reason.NEAR_DUPLICATE, 2, 1.0)


def test_near_check_past_64_candidates():
    rng = random.Random(8)
    query = bytes(rng.getrandbits(8) for _ in range(128))
    index = dedup.DuplicateIndex(False, True, 0.85)
    for ordinal in range(100):  # dissimilar kept samples, the last a near duplicate
        sketch = query if ordinal == 99 else bytes(rng.getrandbits(8) for _ in range(128))
        index.add(ordinal, None, ([1000 + ordinal], sketch))
    bands = [1000 + k for k in range(99)] * 2 + [1000 + 5, 1000 + 99]  # repeats of candidates past the 64 remembered
    assert _check_both_ways(index, (bands, query)) == (Reason.NEAR_DUPLICATE, 99, 1.0)
    assert _check_both_ways(index, (bands[:-1], query)) is None
