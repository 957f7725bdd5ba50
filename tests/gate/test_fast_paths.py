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


@settings(max_examples=300, deadline=None)
@given(text=junk)
def test_screened_ngram_counts_equal_the_full_ones(text):
    from loraforge.gate.repetition import _Screen, dup_ngram_char_frac

    words = words_of(text)
    screen = _Screen(words)
    total = screen.total_chars
    for n in range(1, 11):
        grams = list(zip(*(words[i:] for i in range(n))))
        assert screen.repeats(n) == (len(set(grams)) < len(grams))
        if total:
            assert screen.dup_ngram_char_frac(n) == dup_ngram_char_frac(words, n, total)


WS_PIECES = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x85", "\x1c", "\x0b",
             "a", "word", "'s", "'", "12", "é", "日本", "!", "...", "-", "_"]


@settings(max_examples=500, deadline=None)
@given(text=st.lists(st.sampled_from(WS_PIECES), max_size=40).map("".join) | st.text(max_size=80))
def test_whitespace_segments_keep_gpt2_pre_tokens(text):
    import regex

    from loraforge.models.chat import _GPT2_SPLIT, _segments_regex

    split, segments = regex.compile(_GPT2_SPLIT), _segments_regex()
    pieces = segments.findall(text)
    assert "".join(pieces) == text
    assert [t for piece in pieces for t in split.findall(piece)] == split.findall(text)


def test_white_space_class_is_the_regex_modules():
    import re

    import regex

    from loraforge.models.chat import _WHITE_SPACE

    ours = re.compile(f"[{_WHITE_SPACE}]")
    for code in range(0x110000):
        c = chr(code)
        assert bool(ours.match(c)) == bool(regex.match(r"\s", c)), hex(code)


def test_joined_render_equals_jinja_on_real_data(tiny_tokenizer, alpaca_file, sharegpt_file):
    from loraforge.gate.normalize import normalize
    from loraforge.models.chat import ChatRenderer

    renderer = ChatRenderer(tiny_tokenizer, verify_first=0)
    assert renderer._layouts is not None  # chatml inserts content verbatim
    records = json.loads(alpaca_file.read_text()) + json.loads(sharegpt_file.read_text())
    conversations = [normalize(r) for r in records]
    conversations += [[{"role": "user", "content": c}, {"role": "assistant", "content": c[::-1]}]
                      for c in ["", " ", "\n", " x ", "<|im_end|>", "\ue000", "{{ x }}", "a\n\n"]]
    for messages in conversations:
        for add in (False, True):
            upto = messages[:-1] if add else messages
            assert renderer.render(upto, add) == renderer._fast(upto, add)
    assert any(layout for layout in renderer._layouts.values())


@pytest.mark.parametrize(
    "template",
    [
        "{% for message in messages %}{{ (message['content'] + '') | trim }}\n{% endfor %}",  # strips: probes catch it
        "{% for message in messages %}{{ message['content'] | upper }}{% endfor %}",  # a filter: the source check
        "{% for message in messages %}{% if 'x' in message['content'] %}X{% endif %}{{ message['content'] }}{% endfor %}",
    ],
)
def test_templates_that_touch_content_render_with_jinja(template, tiny_tokenizer):
    import copy

    from loraforge.models.chat import ChatRenderer

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    renderer = ChatRenderer(tokenizer, verify_first=0)
    messages = [{"role": "user", "content": " hi x "}, {"role": "assistant", "content": "ok\n"}]
    assert renderer.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert renderer._layouts is None or not any(renderer._layouts.values())


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(junk, min_size=1, max_size=3), role=st.sampled_from(["user", "assistant", "a b", "", "x\n"]))
def test_normalized_words_equal_the_split_text(texts, role):
    from loraforge.gate.dedup import _normalized

    messages = [{"role": role if i == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    norm, words = _normalized(messages)
    assert norm == normalized_text(messages)
    assert words == norm.split()


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(PII_PIECES), max_size=25).map("".join), min_size=1, max_size=3))
def test_pii_joined_prefilter_never_misses_a_message(texts):
    from loraforge.gate.pii import may_contain_pii

    kinds = list(PATTERNS)
    if any(find_pii(t, kinds) for t in texts):
        assert may_contain_pii("\n".join(texts), kinds)


def test_key_index_through_memoryviews_acts_as_a_dict():
    from loraforge.gate.dedup import KeyIndex

    rng = random.Random(0)
    index, reference = KeyIndex(capacity=16), {}  # small: many collisions and several growths
    for value, key in enumerate([rng.getrandbits(64) for _ in range(500)] + [0, 1, 2**64 - 1, 5, 5]):
        index.add(key, value)
        reference.setdefault(key or 1, value)
    assert index.size == len(reference)
    for key in [*reference, 0, *(rng.getrandbits(64) for _ in range(500))]:
        assert index.get(key) == reference.get(key or 1)


def test_sketch_similarity_counts_as_the_mean_did():
    from loraforge.gate.dedup import DuplicateIndex

    rng = np.random.default_rng(0)
    index = DuplicateIndex(exact=False, near=True, threshold=0.85, num_perm=128)
    for ordinal in range(200):
        kept = rng.integers(0, 256, 128, dtype=np.uint8)
        index.add(ordinal, None, ([ordinal], kept.tobytes()))
        other = np.where(rng.random(128) < rng.random(), kept, rng.integers(0, 256, 128, dtype=np.uint8)).astype(np.uint8)
        equal = float(np.mean(kept == other))
        assert index.jaccard(ordinal, other.tobytes()) == max(0.0, (equal - 1 / 256) / (1 - 1 / 256))
