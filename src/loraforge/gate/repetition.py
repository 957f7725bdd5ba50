"""Measures of degenerate, looping text, calibrated for instruction answers.

Gopher's repetition rules (Rae et al. 2021, as in datatrove's GopherRepetitionFilter) are the
reference, but they were tuned on web pages of 50+ words: on short instruction answers a
single repeated "of the" exceeds the top-2-gram limit. Measured on the shared real data, the
published thresholds reject 300 of 1,000 Alpaca answers and 561 of 1,000 ShareGPT turns. What
loraforge does instead:

* n-gram fractions apply only from ``min_words`` words on, with limits loosened for answers
  whose lists and code repeat legitimately (thresholds in ``RepetitionConfig``);
* duplicate lines count only lines with at least three words (not "}" or "---");
* loop detection at any length: the same phrase of up to ``max_loop_period`` words repeated
  back to back ``loop_repeats`` times, spanning at least ``loop_min_words`` words. This is the
  signature of a degenerate model ("I hope this helps. I hope this helps. I hope ...");
* a run of one character (``"!!!!!!!!"``), ignoring rule characters such as ``-``, ``=``.

The loop search is our own: it looks only at gaps between repeated words, so it costs about
one pass over the words, where comparing every shift up to the period costs one pass per shift.

Most answers cannot fail any rule, and ``find_repetition`` proves that first with exact bounds
computed in C (``_Screen``): a repeated n-gram needs n consecutive words that each occur twice;
the most frequent n-gram covers at most n times the characters of the most frequent word; the
line rule needs ``min_lines`` lines. Every occurrence of a repeated n-gram lies on such a run of
recurring words, so the exact n-gram counts the loop and duplicate rules need come from those
runs alone (``_Screen.grams``). Only a text no bound clears goes through the full measures,
so the verdict is always the one the full measures give (``find_repetition_exact``, tested
equal on real and generated text).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import compress, repeat
from operator import and_, eq, mul

from loraforge.config import RepetitionConfig

try:  # the screen's counts and n-gram measures in C (setup.py builds it); without it, _Screen
    from loraforge.gate import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

_WORD = re.compile(r"\w+")
_RULE_CHARS = " \t\r\n-=_*#|.~+`"


@dataclass(frozen=True, slots=True)
class Loop:
    period: int  # words in the repeated phrase
    repeats: int  # times it occurs back to back
    start: int  # word index where the loop starts
    phrase: str

    @property
    def span(self) -> int:
        return self.period * self.repeats


# ASCII bytes -> the lower-case word character, or a space: for ASCII text,
# ``text.encode().translate(_ASCII_WORDS).split()`` is ``_WORD.findall(text.lower())``, 3x faster.
_ASCII_WORDS = bytes(c if chr(c).isalnum() or c == ord("_") else ord(" ") for c in range(128)).lower() + b" " * 128


def words_of(text: str) -> list[str]:
    if _native is not None:  # one pass in C, ASCII or not (a quarter of findall's time on other text)
        return _native.words(text.lower())
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORDS).decode("ascii").split()
    return _WORD.findall(text.lower())


def word_runs(text: str) -> list[str]:
    """``re.findall(r"\\w+", text)``."""
    return _native.words(text) if _native is not None else _WORD.findall(text)


def loop_gram(min_repeats: int, min_span: int) -> int:
    """A loop of R >= ``min_repeats`` repeats of a p-word phrase spanning S >= ``min_span`` words
    has its first S - p = S (R - 1) / R words again one period later, so some n-gram of this
    length occurs twice (8 at the defaults, 3 repeats over 12 words): a text without a repeated
    n-gram of this length holds no such loop."""
    return max(1, min(8, min_span * (min_repeats - 1) // min_repeats))


def longest_loop(words: list[str], min_repeats: int, max_period: int, min_span: int = 1) -> Loop | None:
    """The back-to-back repeated phrase covering the most words (at least ``min_repeats`` times);
    loops spanning fewer than ``min_span`` words may be missed (the caller's floor)."""
    n = loop_gram(min_repeats, min_span)  # no repeated n-gram: no loop that counts (checked in C)
    if len(set(zip(*(words[i:] for i in range(n))))) == max(len(words) - n + 1, 0):
        return None
    frequent = {w for w, c in Counter(words).items() if c >= min_repeats}
    positions: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        if w in frequent:
            positions.setdefault(w, []).append(i)
    best: Loop | None = None
    tried: set[tuple[int, int]] = set()
    n = len(words)
    # a phrase said 3+ times has a word whose next two occurrences are `period` apart; one said
    # twice (min_repeats 2), a word whose next occurrence is
    span = 3 if min_repeats >= 3 else 2
    for pos in positions.values():
        for window in zip(*(pos[i:] for i in range(span))):
            a, b = window[0], window[1]
            period = b - a
            if (span == 3 and period != window[2] - b) or period > max_period or (a, period) in tried:
                continue
            # grow the match words[i] == words[i + period] around a, in both directions
            start, end = a, a
            while start > 0 and words[start - 1] == words[start - 1 + period]:
                start -= 1
            while end + period < n and words[end] == words[end + period]:
                end += 1
            tried.update((s, period) for s in range(start, end, period))
            repeats = (end - start) // period + 1
            if repeats >= min_repeats and (best is None or period * repeats > best.span):
                best = Loop(period, repeats, start, " ".join(words[start : start + period]))
    return best


def _ngram_counts(words: list[str], n: int) -> tuple[list[tuple[str, ...]], Counter]:
    grams = list(zip(*(words[i:] for i in range(n))))
    return grams, Counter(grams)


def top_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    """Characters in the most frequent n-gram (all its occurrences) over all word characters."""
    grams, counts = _ngram_counts(words, n)
    if len(counts) == len(grams):  # every n-gram is unique: the common case, decided in C
        return 0.0
    count = max(counts.values())
    gram = next(g for g, c in counts.items() if c == count)
    return sum(map(len, gram)) * count / total_chars


def dup_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words covered by n-grams that occur more than once, over all word characters."""
    grams, counts = _ngram_counts(words, n)
    if len(counts) == len(grams):
        return 0.0
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def dup_line_frac(text: str) -> tuple[float, int]:
    """Fraction of lines (of three or more words) that repeat an earlier one, and how many there are."""
    if _native is not None and text.isascii():  # the same lines and words, counted in C
        distinct, n_lines = _native.dup_lines(text)
        return (1 - distinct / n_lines, n_lines) if n_lines else (0.0, 0)
    lines = list(map(" ".join, map(str.split, map(str.lower, text.splitlines()))))
    lines = list(compress(lines, map((2).__le__, map(str.count, lines, repeat(" ")))))  # 3+ words
    if not lines:
        return 0.0, 0
    return 1 - len(set(lines)) / len(lines), len(lines)


_CHAR_RUN_CACHE: dict[int, re.Pattern] = {}


def char_run(text: str, length: int) -> re.Match | None:
    """The first run of one (non rule) character ``length`` times or more."""
    pattern = _CHAR_RUN_CACHE.get(length)
    if pattern is None:
        rule = re.escape(_RULE_CHARS)
        pattern = _CHAR_RUN_CACHE[length] = re.compile(rf"([^{rule}])\1{{{length - 1},}}")
    if _native is not None:  # one scan of the runs in C; the regex only where it will match
        start = _native.char_run_start(text, length, _RULE_CHARS)
        return pattern.match(text, start) if start >= 0 else None
    # A run of 2k characters covers a whole aligned window [m, m + k) with m a multiple of k:
    # test three points of every aligned window in C first, then the windows whose three points
    # agree, and search only if one window is constant.
    step = length // 2
    if step >= 3:
        first, middle, last = text[::step], text[step // 2 :: step], text[step - 1 :: step]
        hits = compress(range(len(last)), map(and_, map(eq, first, middle), map(eq, middle, last)))
        if not any(
            (window := text[m * step : (m + 1) * step]) == window[0] * step and window[0] not in _RULE_CHARS for m in hits
        ):
            return None
    return pattern.search(text)


class _Screen:
    """Exact, cheap bounds (all computed in C) that clear most texts of the n-gram rules."""

    def __init__(self, words: list[str]):
        counts = Counter(words)
        # 1 where the word occurs again somewhere: a repeated n-gram lies on a run of n such words
        self.repeated = bytes(map((1).__lt__, map(counts.__getitem__, words)))
        # the most characters one word accounts for (all its occurrences)
        self.top_word_chars = max(map(mul, map(len, counts), counts.values()), default=0)
        self.total_chars = sum(map(len, words))
        self.words = words

    def may_repeat(self, n: int) -> bool:
        """False proves that no word n-gram occurs twice."""
        return b"\x01" * n in self.repeated

    def repeated_chars(self) -> int:
        """An upper bound of the characters of words covered by repeated n-grams, for any n."""
        return sum(map(len, compress(self.words, self.repeated)))

    def starts(self, n: int) -> list[int]:
        """Where the n-grams of only recurring words start: every occurrence of a repeated n-gram is one."""
        needle, repeated, found = b"\x01" * n, self.repeated, []
        i = repeated.find(needle)
        while i >= 0:
            found.append(i)
            i = repeated.find(needle, i + 1)
        return found

    def grams(self, n: int) -> tuple[list[int], list[tuple[str, ...]], Counter]:
        """The n-grams at ``starts(n)`` and their counts: the exact count of every n-gram that occurs twice."""
        starts, words = self.starts(n), self.words
        grams = [tuple(words[i : i + n]) for i in starts]
        return starts, grams, Counter(grams)

    def repeats(self, n: int) -> bool:
        """Whether some word n-gram occurs twice."""
        _, grams, counts = self.grams(n)
        return len(counts) < len(grams)

    def top_ngram_char_frac(self, n: int) -> float:
        return top_ngram_char_frac(self.words, n, self.total_chars)

    def longest_loop(self, min_repeats: int, max_period: int, min_span: int) -> Loop | None:
        return longest_loop(self.words, min_repeats, max_period, min_span)

    def dup_ngram_char_frac(self, n: int) -> float:
        """``dup_ngram_char_frac(words, n, total_chars)``, over the candidate n-grams only."""
        starts, grams, counts = self.grams(n)
        if len(counts) == len(grams):
            return 0.0
        covered = bytearray(len(self.words))
        for i, gram in zip(starts, grams):
            if counts[gram] > 1:
                covered[i : i + n] = b"\x01" * n
        return sum(map(len, compress(self.words, covered))) / self.total_chars


class _NativeScreen(_Screen):
    """``_Screen`` in C: the words numbered by first occurrence, every count and measure over
    those numbers (``_native``), the same values (tested against ``_Screen``)."""

    def __init__(self, words: list[str]):
        self.words = words
        self.ids, self.repeated, self.top_word_chars, self.total_chars, self._repeated_chars = _native.word_ids(words)

    def repeated_chars(self) -> int:
        return self._repeated_chars

    def repeats(self, n: int) -> bool:
        return _native.gram_repeats(self.ids, n)

    def top_ngram_char_frac(self, n: int) -> float:
        return _native.top_gram_chars(self.words, self.ids, n) / self.total_chars

    def dup_ngram_char_frac(self, n: int) -> float:
        return _native.dup_gram_chars(self.words, self.ids, n) / self.total_chars

    def longest_loop(self, min_repeats: int, max_period: int, min_span: int) -> Loop | None:
        """``longest_loop`` without its repeated-n-gram shortcut, which ``find_repetition`` takes first."""
        found = _native.longest_loop(self.ids, min_repeats, max_period)
        if found is None:
            return None
        period, repeats, start = found
        return Loop(period, repeats, start, " ".join(self.words[start : start + period]))


def screen_of(words: list[str]) -> _Screen:
    return _NativeScreen(words) if _native is not None else _Screen(words)


def find_repetition(text: str, cfg: RepetitionConfig, words: list[str] | None = None) -> str | None:
    """Why ``text`` looks degenerate, or None: the verdict of ``find_repetition_exact``, faster.
    ``words``: ``words_of(text)`` where the caller has it."""
    if cfg.char_run is not None and (run := char_run(text, cfg.char_run)):
        return f"the character {run.group(1)!r} repeated {len(run.group(0))} times in a row"
    words = words_of(text) if words is None else words
    screen = screen_of(words)
    gram = loop_gram(cfg.loop_repeats or 2, cfg.loop_min_words)
    if cfg.loop_repeats is not None and len(words) >= cfg.loop_min_words and screen.may_repeat(gram) and screen.repeats(gram):
        # no repeated n-gram of that length: longest_loop finds nothing (see loop_gram)
        if why := _loop_rule(screen.longest_loop(cfg.loop_repeats, cfg.max_loop_period, cfg.loop_min_words), words, cfg):
            return why
    if len(words) < cfg.min_words:
        return None
    if cfg.dup_line_frac is not None and len(text.splitlines()) >= cfg.min_lines and (why := _line_rule(text, cfg)):
        return why
    total = screen.total_chars
    for n, limit in (cfg.top_ngram_char_frac or {}).items():
        # the top n-gram's characters times its count <= n times the top word's characters
        if n * screen.top_word_chars / total > limit and (why := _top_ngram_rule(screen.top_ngram_char_frac(n), n, limit)):
            return why
    dup_limits = sorted((cfg.dup_ngram_char_frac or {}).items())
    if dup_limits and any(screen.may_repeat(n) for n, _ in dup_limits):
        bound = screen.repeated_chars() / total
        if any(bound > limit for _, limit in dup_limits):
            return _dup_ngram_rule(dup_limits, screen.dup_ngram_char_frac)
    return None


def find_repetition_exact(text: str, cfg: RepetitionConfig) -> str | None:
    """The reference: every measure in full, cheapest rules first."""
    if cfg.char_run is not None and (run := char_run(text, cfg.char_run)):
        return f"the character {run.group(1)!r} repeated {len(run.group(0))} times in a row"
    words = words_of(text)
    if cfg.loop_repeats is not None and len(words) >= cfg.loop_min_words:
        if why := _loop_rule(longest_loop(words, cfg.loop_repeats, cfg.max_loop_period, cfg.loop_min_words), words, cfg):
            return why
    if len(words) < cfg.min_words:
        return None
    if cfg.dup_line_frac is not None and (why := _line_rule(text, cfg)):
        return why
    total = sum(map(len, words))
    for n, limit in (cfg.top_ngram_char_frac or {}).items():
        if why := _top_ngram_rule(top_ngram_char_frac(words, n, total), n, limit):
            return why
    return _dup_ngram_rule(sorted((cfg.dup_ngram_char_frac or {}).items()), lambda n: dup_ngram_char_frac(words, n, total))


def _loop_rule(loop: Loop | None, words: list[str], cfg: RepetitionConfig) -> str | None:
    if loop is not None and loop.span >= cfg.loop_min_words:
        return f"loop: {loop.phrase!r} repeated {loop.repeats} times back to back ({loop.span} of {len(words)} words)"
    return None


def _line_rule(text: str, cfg: RepetitionConfig) -> str | None:
    frac, n_lines = dup_line_frac(text)
    if n_lines >= cfg.min_lines and frac > cfg.dup_line_frac:
        return f"{frac:.0%} of {n_lines} lines repeat an earlier line (limit {cfg.dup_line_frac:.0%})"
    return None


def _top_ngram_rule(frac: float, n: int, limit: float) -> str | None:
    if frac > limit:
        return f"the most frequent {n}-gram covers {frac:.0%} of the characters (limit {limit:.0%})"
    return None


def _dup_ngram_rule(dup_limits: list[tuple[int, float]], frac_of) -> str | None:
    """``frac_of(n)``: the characters covered by repeated n-grams, as a fraction."""
    for n, limit in dup_limits:
        frac = frac_of(n)
        if frac > limit:
            return f"repeated {n}-grams cover {frac:.0%} of the characters (limit {limit:.0%})"
        # longer repeated n-grams cover a subset of the words shorter ones cover: stop early
        if frac <= min(lim for m, lim in dup_limits if m >= n):
            break
    return None
