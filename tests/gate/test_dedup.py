import random

from loraforge.gate.dedup import DuplicateIndex, KeyIndex, MinHasher, exact_key, lsh_params, normalized_text, word_hashes
from loraforge.gate.verdict import Reason


def conv(answer: str, question: str = "Tell me about rivers.") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


BASE = (
    "Rivers carry water from high ground to the sea, shaping valleys, feeding wetlands and giving "
    "cities drinking water, transport routes and power for mills and turbines along their banks. "
    "Their floods renew farmland with silt, their deltas host fisheries and birds, and their "
    "estuaries mix salt and fresh water into some of the most productive habitats on Earth, which "
    "is why so many civilizations grew up beside them and still depend on them for food today."
)


def test_normalization_ignores_case_whitespace_and_punctuation():
    a = normalized_text(conv("Hello,   WORLD!"))
    b = normalized_text(conv("hello world"))
    assert a == b and exact_key(a) == exact_key(b)
    assert normalized_text(conv("hello world", "Other question")) != a


def _index(samples, threshold=0.85):
    hasher = MinHasher(128, threshold, 5)
    index = DuplicateIndex(True, True, threshold, 128)
    verdicts = []
    for i, messages in enumerate(samples):
        norm = normalized_text(messages)
        keys = exact_key(norm), hasher.keys(word_hashes(norm.split()))
        hit = index.check(*keys)
        verdicts.append(hit)
        if hit is None:
            index.add(i, *keys)
    return verdicts


def test_exact_and_near_duplicates_keep_the_first():
    near = BASE.replace("turbines", "wheels")  # one word changed: Jaccard of 5-gram sets ~0.9
    different = "Mountains are formed by tectonic forces and erosion over millions of years, slowly."
    verdicts = _index([conv(BASE), conv(BASE.upper()), conv(near), conv(different)])
    assert verdicts[0] is None
    assert verdicts[1][:2] == (Reason.EXACT_DUPLICATE, 0)
    assert verdicts[2][:2] == (Reason.NEAR_DUPLICATE, 0) and verdicts[2][2] >= 0.85
    assert verdicts[3] is None


def test_lsh_hits_below_threshold_are_verified_away():
    """Templated samples share most shingles: band collisions happen, verification rejects them."""
    rng = random.Random(0)
    words = BASE.split()
    samples = []
    for _ in range(300):
        w = list(words)
        for k in rng.sample(range(len(w)), 5):  # Jaccard of 5-gram sets well below 0.85
            w[k] = rng.choice(["stone", "cloud", "lamp", "ember", "violet", "anchor"])
        samples.append(conv(" ".join(w)))
    hits = [v for v in _index(samples) if v is not None]
    assert all(sim >= 0.85 for _, _, sim in hits)
    assert len(hits) < 15


def test_lsh_parameters_put_the_curve_at_the_threshold():
    bands, rows = lsh_params(0.85, 128)
    assert bands * rows <= 128
    assert 0.75 < (1 / bands) ** (1 / rows) < 0.95


def test_key_index_grows_and_keeps_first_value():
    index = KeyIndex(capacity=8)
    for k in range(1, 1000):
        index.add(k * 7919, k)
    index.add(7919, 123)  # a second add does not overwrite
    assert index.size == 999
    assert index.get(7919) == 1 and index.get(998 * 7919) == 998
    assert index.get(5) is None
    index.add(0, 42)  # key 0 is stored too
    assert index.get(0) == 42
