"""Duplicates and eval overlap: exact (normalized text), near (MinHash LSH), 13-gram decontamination.

Workers compute the keys of each sample (pure functions of its text); the main process checks
them against the index of samples kept so far, in input order, so the first of a cluster is
kept whatever the number of workers.

Our own MinHash, not datasketch's: datasketch hashes every shingle with a Python call per
permutation set and took 474-527 us a sample on the shared Alpaca file, where this vectorized
numpy version takes about a quarter of that, and the C extension's (``_native.minhash``, the
same values) ~10 us. The LSH index stores band hashes in a flat
open-addressing uint64 table (``KeyIndex``): 16 bytes a key against ~100 bytes in a Python
dict of lists, which keeps the gate's memory small on million-record files.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import xxhash

from loraforge.gate.repetition import word_runs, words_of
from loraforge.gate.verdict import Reason, Reject, Sample

try:  # the hot loops in C (setup.py builds it); without it, the numpy versions below, same values
    from loraforge.gate import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

_MERSENNE = np.uint64((1 << 61) - 1)


def normalized_text(messages: list[dict[str, str]]) -> str:
    """Case, accents of compatibility forms, whitespace and punctuation do not make a sample new."""
    return _normalized(messages)[0]


def _normalized(messages: list[dict[str, str]], words_of_message=None) -> tuple[str, list[str]]:
    """``normalized_text(messages)`` and its ``split()``, built together (no word holds whitespace).
    ``words_of_message(i)``: ``words_of`` message i's content, where the caller keeps it."""
    parts, all_words = [], []
    for i, m in enumerate(messages):
        text = m["content"]
        if text.isascii():  # NFKC and casefold leave ASCII as lower(): the words of words_of
            words = words_of_message(i) if words_of_message else words_of(text)
        else:
            words = word_runs(unicodedata.normalize("NFKC", text).casefold())
        parts.append(m["role"] + ": " + " ".join(words))
        all_words.append(m["role"] + ":")
        all_words += words
    norm = "\n".join(parts)
    if any(m["role"].split() != [m["role"]] for m in messages):  # a role with whitespace: split the text
        all_words = norm.split()
    return norm, all_words


def exact_key(norm: str) -> int:
    return xxhash.xxh3_64_intdigest(norm.encode("utf-8"))


class _WordHashes(dict):
    """word -> stable 64-bit hash, memoized: ``map(cache.__getitem__, words)`` runs in C for known words."""

    def __missing__(self, word: str) -> int:
        if len(self) > 2_000_000:
            self.clear()
        value = self[word] = xxhash.xxh3_64_intdigest(word.encode("utf-8"))
        return value


_WORD_HASHES = _WordHashes()
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX_POWERS = {1 << k: np.uint64(pow(0x9E3779B97F4A7C15, 1 << k, 1 << 64)) for k in range(32)}


def word_hashes(words: list[str]) -> np.ndarray:
    if _native is not None:
        return np.frombuffer(_native.word_hashes(words, _WORD_HASHES), dtype=np.uint64)
    return np.fromiter(map(_WORD_HASHES.__getitem__, words), dtype=np.uint64, count=len(words))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """A hash per word n-gram: a rolling mix of its word hashes (wrapping uint64 arithmetic)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    if _native is not None:  # the same sum in Horner form, one pass
        return np.frombuffer(_native.ngram_hashes(hashes, n), dtype=np.uint64)
    # gram(i, n) = sum_k hashes[i + k] * MIX^(n-1-k) mod 2^64, built by doubling:
    # gram(i, a + b) = gram(i, a) * MIX^b + gram(i + a, b), about 2 log2(n) array operations
    grams, have = None, 0  # grams of `have` words, for the first len(hashes) - have + 1 positions
    power, width = hashes, 1  # grams of `width` words (a power of two)
    while True:
        if n & width:
            if grams is None:
                grams, have = power, width
            else:
                grams = grams[: len(power) - have] * _MIX_POWERS[width] + power[have:]
                have += width
        if width * 2 > n:
            break
        power = power[:-width] * _MIX_POWERS[width] + power[width:]
        width *= 2
    return grams[:count].copy() if grams is hashes else grams[:count]


def sample_features(sample: Sample) -> tuple[str, list[str], np.ndarray]:
    """Normalized text, its words and their hashes: computed once, shared by every check that needs them."""
    cached = sample.cache.get("features")
    if cached is None:
        norm, words = _normalized(sample.messages, sample.words)
        cached = sample.cache["features"] = (norm, words, word_hashes(words))
    return cached


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows whose S-curve minimizes false positives plus false negatives around ``threshold``."""

    def area(f, lo, hi, steps=200):
        step = (hi - lo) / steps
        return sum(f(lo + (k + 0.5) * step) for k in range(steps)) * step

    best, best_err = (1, num_perm), math.inf
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        fp = area(lambda s: 1 - (1 - s**rows) ** bands, 0.0, threshold)
        fn = area(lambda s: (1 - s**rows) ** bands, threshold, 1.0)
        if fp + fn < best_err:
            best, best_err = (bands, rows), fp + fn
    return best


class MinHasher:
    """MinHash signatures of word n-gram shingles, banded into LSH keys."""

    def __init__(self, num_perm: int, threshold: float, shingle_words: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.n = shingle_words
        self.buffer = np.empty((256, num_perm), dtype=np.uint64)

    def shingles(self, hashes: np.ndarray) -> np.ndarray:
        """Hashes of the word ``n``-gram shingles, from the words' hashes."""
        shingles = ngram_hashes(hashes, self.n)
        if not len(shingles):  # fewer words than a shingle: the whole text is one shingle
            shingles = ngram_hashes(hashes, len(hashes)) if len(hashes) else np.zeros(1, dtype=np.uint64)
        return shingles

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """MinHash of the word ``n``-gram shingles, from the words' hashes."""
        shingles = self.shingles(hashes)
        if _native is not None:
            return np.frombuffer(_native.minhash(shingles, self.a, self.b)[0], dtype=np.uint64)
        # universal hashing a*x+b, wrapping mod 2^64; the high bits decide the minimum. In place in
        # a buffer kept between calls: a fresh (shingles x num_perm) array costs page faults.
        if len(self.buffer) < len(shingles):
            self.buffer = np.empty((max(len(shingles), 2 * len(self.buffer)), len(self.a)), dtype=np.uint64)
        values = self.buffer[: len(shingles)]
        np.multiply(shingles[:, None], self.a[None, :], out=values)
        values += self.b[None, :]
        return values.min(axis=0)

    def keys(self, hashes: np.ndarray) -> tuple[list[int], bytes]:
        """LSH band keys, and the top byte of every minimum (b-bit MinHash, b = 8) to verify a hit."""
        if _native is not None:  # the signature, its band keys and its sketch in one call
            return _native.minhash(self.shingles(hashes), self.a, self.b, self.bands, self.rows)
        sig = self.signature(hashes)
        bands = [band_key(sig[i * self.rows : (i + 1) * self.rows].tolist(), i) for i in range(self.bands)]
        return bands, (sig >> np.uint64(56)).astype(np.uint8).tobytes()


_U64 = (1 << 64) - 1


def band_key(values: list[int], seed: int) -> int:
    """A 64-bit key of one LSH band's minimums (equal bands, equal keys; a collision of unequal
    ones only makes a candidate that the sketch comparison then turns down). Keys live for one
    run, so the hash is ours: the C twin folds a band in ~10 ns."""
    h = (seed * 0x9E3779B97F4A7C15 + len(values)) & _U64
    for v in values:
        h = ((h ^ v) * 0xC2B2AE3D27D4EB4F) & _U64
        h = ((h << 31) | (h >> 33)) & _U64
    # xxh64's avalanche
    h ^= h >> 33
    h = (h * 0xC2B2AE3D27D4EB4F) & _U64
    h ^= h >> 29
    h = (h * 0x165667B19E3779F9) & _U64
    return h ^ (h >> 32)


class KeyIndex:
    """A set of uint64 keys, each mapped to a uint32 value (the ordinal of the kept sample).

    Open addressing with linear probing in two numpy arrays; key 0 marks an empty slot (a real
    key of 0 is stored as 1: one more collision in 2^64).
    """

    def __init__(self, capacity: int = 1 << 16):
        self._allocate(capacity)
        self.size = 0

    def _allocate(self, capacity: int) -> None:
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.values = np.zeros(capacity, dtype=np.uint32)
        # memoryviews of the same memory: reading one slot gives a Python int ~4x faster than numpy indexing
        self._keys, self._values = memoryview(self.keys), memoryview(self.values)

    def _slot(self, key: int) -> int:
        keys = self._keys
        mask = len(keys) - 1
        i = (key * 0x9E3779B97F4A7C15 >> 20) & mask
        while True:
            k = keys[i]
            if k == 0 or k == key:
                return i
            i = (i + 1) & mask

    def get(self, key: int) -> int | None:
        key = key or 1
        i = self._slot(key)
        return self._values[i] if self._keys[i] == key else None

    def get_all(self, keys: list[int]) -> list[int]:
        """The values of those of ``keys`` that are present, in order (with the C extension,
        ``_native.near_check`` probes the table itself)."""
        return [value for key in keys if (value := self.get(key)) is not None]

    def add(self, key: int, value: int) -> None:
        key = key or 1
        if (self.size + 1) * 2 > len(self.keys):
            self._grow()
        i = self._slot(key)
        if self._keys[i] == 0:
            self._keys[i], self._values[i] = key, value
            self.size += 1

    def add_all(self, keys: list[int], value: int) -> None:
        """``add(key, value)`` for every key (the table may grow a call earlier: same contents)."""
        if _native is None:
            for key in keys:
                self.add(key, value)
            return
        while (self.size + len(keys)) * 2 > len(self.keys):
            self._grow()
        self.size += _native.key_add_all(self.keys, self.values, keys, value)

    def _grow(self) -> None:
        old_keys, old_values = self.keys, self.values
        self._allocate(len(old_keys) * 2)
        if _native is not None:
            self.size = _native.key_rehash(self.keys, self.values, old_keys, old_values)
            return
        self.size = 0
        for key, value in zip(old_keys[old_keys != 0].tolist(), old_values[old_keys != 0].tolist()):
            self.add(key, value)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class DuplicateIndex:
    """Exact and near duplicates among the samples kept so far (main process, input order).

    An LSH band hit is only a candidate: with many similar samples (templated data) pairs well
    below the threshold share a band by chance. Each candidate is verified against the stored
    8-bit MinHash sketch of the kept sample (Li & Koenig's b-bit MinHash: P(equal byte) =
    J + (1 - J) / 256), which costs num_perm bytes per kept sample.
    """

    def __init__(self, exact: bool, near: bool, threshold: float, num_perm: int = 128):
        self.exact = KeyIndex() if exact else None
        self.near = KeyIndex() if near else None
        self.threshold = threshold
        self.sketches = np.zeros((1024, num_perm), dtype=np.uint8) if near else None
        # the same memory as flat bytes: a row written by slice assignment, ~10x cheaper than numpy's
        self._rows = memoryview(self.sketches).cast("B") if near else None

    def jaccard(self, ordinal: int, sketch: bytes) -> float:
        # a count over num_perm: the same float as np.mean of the comparison, ~5x faster; the
        # Python twin of the comparison inside _native.near_check
        equal = np.count_nonzero(self.sketches[ordinal] == np.frombuffer(sketch, dtype=np.uint8)) / len(sketch)
        return max(0.0, (equal - 1 / 256) / (1 - 1 / 256))

    def check(self, exact: int | None, near: tuple[list[int], bytes] | None) -> tuple[Reason, int, float] | None:
        """(reason, ordinal of the kept sample it duplicates, similarity), or None when the sample is new."""
        if self.exact is not None and exact is not None and (hit := self.exact.get(exact)) is not None:
            return Reason.EXACT_DUPLICATE, hit, 1.0
        if self.near is not None and near:
            bands, sketch = near
            if _native is not None:  # the probes, the comparisons and the threshold in one call
                hit = _native.near_check(self.near.keys, self.near.values, self.sketches, bands, sketch, self.threshold)
                return None if hit is None else (Reason.NEAR_DUPLICATE, *hit)
            for candidate in dict.fromkeys(self.near.get_all(bands)):
                similarity = self.jaccard(candidate, sketch)
                if similarity >= self.threshold:
                    return Reason.NEAR_DUPLICATE, candidate, similarity
        return None

    def add(self, ordinal: int, exact: int | None, near: tuple[list[int], bytes] | None) -> None:
        if self.exact is not None and exact is not None:
            self.exact.add(exact, ordinal)
        if self.near is not None and near:
            bands, sketch = near
            if ordinal >= len(self.sketches):
                self.sketches = np.concatenate([self.sketches, np.zeros_like(self.sketches)])
            if self._rows.obj is not self.sketches:  # grown, or replaced from outside
                self._rows = memoryview(self.sketches).cast("B")
            width = self.sketches.shape[1]
            self._rows[ordinal * width : (ordinal + 1) * width] = sketch
            self.near.add_all(bands, ordinal)


class EvalOverlapCheck:
    """Reject a sample sharing any word ``n``-gram (default 13, as in GPT-3's decontamination) with eval data."""

    code = Reason.EVAL_OVERLAP

    def __init__(self, eval_messages: list[list[dict[str, str]]], n: int):
        self.n = n
        keys = [ngram_hashes(word_hashes(normalized_text(m).split()), n) for m in eval_messages]
        self.keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.uint64)
        # without the C search, the same keys as a set: ``isdisjoint`` clears most samples ~3x
        # faster than the sorted search
        self.key_set = frozenset(self.keys.tolist()) if _native is None else None

    def __call__(self, sample: Sample) -> Reject | None:
        _, words, hashes = sample_features(sample)
        grams = ngram_hashes(hashes, self.n)
        if not len(grams) or not len(self.keys):
            return None
        i = self._first_hit(grams)
        if i < 0:
            return None
        return Reject(self.code, f"shares the {self.n}-gram {' '.join(words[i : i + self.n])!r} with the eval data")

    def _first_hit(self, grams: np.ndarray) -> int:
        """Index of the first of ``grams`` among the eval keys, or -1."""
        if _native is not None:  # a binary search per n-gram in C
            return _native.first_member(grams, self.keys)
        if self.key_set is None:  # built with the extension, which was switched off since (tests)
            self.key_set = frozenset(self.keys.tolist())
        if self.key_set.isdisjoint(grams.tolist()):
            return -1
        slots = np.minimum(np.searchsorted(self.keys, grams), len(self.keys) - 1)
        hits = np.flatnonzero(self.keys[slots] == grams)
        return int(hits[0]) if len(hits) else -1
