"""The gate's fast paths give exactly what their reference paths give, on real data and on junk."""

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.config import RepetitionConfig
from loraforge.gate.dedup import ngram_hashes, normalized_text
from loraforge.gate.pii import PATTERNS, _DIGITS, _may_contain, find_pii
from loraforge.gate.repetition import char_run, find_repetition, find_repetition_exact, words_of

CFG = RepetitionConfig()
# pieces that stress the bounds: repeated words and lines, runs, rule characters, non-ASCII case
PIECES = ["the", "a", "of", "cat", "I", "hope", "this", "helps", ".", " ", "  ", "\n", "\n\n", "!!", "!" * 25, "-" * 30,
          "é", "Σ", "İ", "ﬁ", "_", "x1", "2020", "=", "| a |"]
junk = st.lists(st.sampled_from(PIECES), max_size=300).map("".join) | st.text(max_size=200)


def _real_texts(alpaca_file, sharegpt_file) -> list[str]:
    texts = [r["output"] for r in json.loads(alpaca_file.read_text())]
    texts += [t["value"] for c in json.loads(sharegpt_file.read_text()) for t in c["conversations"]]
    looped = [t + " " + (t.split(".")[0] + ". ") * 3 for t in texts[:1000]]
    return texts + looped


def _old_words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+", text.lower())


@settings(max_examples=150, deadline=None)
@given(text=junk)
def test_repetition_fast_path_agrees_on_junk(text):
    assert words_of(text) == _old_words(text)
    assert find_repetition(text, CFG) == find_repetition_exact(text, CFG)
    loose = RepetitionConfig(min_words=5, loop_min_words=4, loop_repeats=2, min_lines=2, char_run=6)
    assert find_repetition(text, loose) == find_repetition_exact(text, loose)


@settings(max_examples=150, deadline=None)
@given(text=junk, length=st.integers(2, 60))
def test_char_run_prefilter_never_misses_a_run(text, length):
    import re

    rule = re.escape(" \t\r\n-=_*#|.~+`")
    expected = re.search(rf"([^{rule}])\1{{{length - 1},}}", text)
    found = char_run(text, length)
    assert (found and found.group(0)) == (expected and expected.group(0))


def test_repetition_fast_path_agrees_on_real_data(alpaca_file, sharegpt_file):
    for text in _real_texts(alpaca_file, sharegpt_file):
        assert find_repetition(text, CFG) == find_repetition_exact(text, CFG)


def test_ngram_hashes_by_doubling_equal_the_rolling_hash():
    mix = np.uint64(0x9E3779B97F4A7C15)
    rng = np.random.default_rng(0)
    for length in range(0, 40):
        hashes = rng.integers(0, 2**63, length, dtype=np.uint64)
        for n in range(1, 20):
            count = length - n + 1
            expected = hashes[: max(count, 0)].copy()
            for k in range(1, n if count > 0 else 1):
                expected = expected * mix + hashes[k : k + count]
            assert np.array_equal(ngram_hashes(hashes, n), expected), (length, n)


@settings(max_examples=200, deadline=None)
@given(text=junk)
def test_normalized_text_ascii_path_agrees(text):
    import re
    import unicodedata

    text = text.encode("ascii", "ignore").decode()
    expected = "user: " + " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))
    assert normalized_text([{"role": "user", "content": text}]) == expected


PII_PIECES = ["1", "23", "456", "7890", " ", ".", "-", "+", "(", ")", ":", "a", "F", "@", "x.com", "sk-", "AKIA",
              "ghp_", "gh", "s_", "hf_", "xoxb-", "AIza", "٣", "é", "_", "Z", "0" * 20, "A" * 16]


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(PII_PIECES), max_size=40).map("".join))
def test_pii_prefilters_never_miss_a_match(text):
    digits = text.encode("ascii").translate(_DIGITS) if text.isascii() else None
    for kind, pattern in PATTERNS.items():
        if pattern.search(text):
            assert _may_contain(kind, text, digits), (kind, text)


@pytest.mark.slow
def test_token_counter_chunk_path_is_exact(embedded_tokenizer, alpaca_file, sharegpt_file):
    from loraforge.gate.normalize import normalize
    from loraforge.models.chat import ChatRenderer, TokenCounter

    renderer = ChatRenderer(embedded_tokenizer)
    counter = TokenCounter(embedded_tokenizer, verify_first=0)
    assert counter.fast
    records = json.loads(alpaca_file.read_text()) + json.loads(sharegpt_file.read_text())
    texts = [renderer.render(normalize(r)) for r in records]
    rng = random.Random(0)
    pieces = [" ", "  ", "\n", "\t", " \n", "a", "word", "Word", "'s", "'ll", "123", "4", "é", "日本", "\u00a0",
              "\u2003", "\x85", "\x1c", "!", "...", "<|im_end|>", "<|im_start|>", "(", "-", "\r\n"]
    texts += ["".join(rng.choices(pieces, k=rng.randint(0, 60))) for _ in range(3000)]
    for text in texts:
        assert counter(text) == counter.exact(text), repr(text)
    assert counter.fast  # never fell back
