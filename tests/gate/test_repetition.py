"""Loops are caught; real answers are kept (>= 98% of the shared real data, figures printed)."""

import json

import pytest

from loraforge.config import RepetitionConfig
from loraforge.gate.repetition import find_repetition, longest_loop, words_of

CFG = RepetitionConfig()

DEGENERATE = [
    "I hope this helps. " * 5,
    "The answer is 42. The answer is 42. The answer is 42. The answer is 42.",
    "Sure! Here is the list: apples, pears. " + "and then and then and then " * 6,
    "Great question!" + "!" * 60,
    "Step 1: mix. Step 2: bake. " + "Let me know if you have any other questions. " * 3,
    "\n".join(["We should go to the park today."] * 3 + ["Fine."]),
    # long text with the same sentences recurring, not back to back
    " ".join(
        f"Point {i}: the quick brown fox jumps over the lazy dog near the river bank today." for i in range(12)
    ),
]

GOOD = [
    "1",
    "Negative",
    "No, no, no. That is not how it works.",
    "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep.",
    "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n" + "-" * 60,
    "def f(x):\n    return x\n\ndef g(x):\n    return x\n",
    "Row, row, row your boat, gently down the stream. Merrily, merrily, merrily, merrily, life is but a dream.",
    "The mitochondria is the powerhouse of the cell. It produces ATP through cellular respiration, "
    "which involves glycolysis, the citric acid cycle and oxidative phosphorylation. "
    "Each stage takes place in a different part of the cell and yields a different amount of energy.",
]


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_text_is_caught(text):
    assert find_repetition(text, CFG) is not None


@pytest.mark.parametrize("text", GOOD)
def test_good_text_is_kept(text):
    assert find_repetition(text, CFG) is None


def test_loop_reports_phrase_and_count():
    loop = longest_loop(words_of("intro words here " + "i hope this helps " * 4 + "bye"), 3, 32)
    assert loop.phrase == "i hope this helps" and loop.repeats == 4 and loop.period == 4


def test_rules_switch_off():
    text = "I hope this helps. " * 5
    assert find_repetition(text, RepetitionConfig(loop_repeats=None)) is None


def _kept_share(texts):
    rejected = [(t, why) for t in texts if (why := find_repetition(t, CFG))]
    return 1 - len(rejected) / len(texts), rejected


def test_calibrated_on_real_alpaca_answers(alpaca_file):
    answers = [r["output"] for r in json.loads(alpaca_file.read_text())]
    share, rejected = _kept_share(answers)
    print(f"\nrepetition: kept {share:.1%} of {len(answers)} Alpaca answers; rejected {len(rejected)}")
    assert share >= 0.98


def test_calibrated_on_real_sharegpt_turns(sharegpt_file):
    turns = [t["value"] for c in json.loads(sharegpt_file.read_text()) for t in c["conversations"] if t["from"] == "gpt"]
    share, rejected = _kept_share(turns)
    print(f"\nrepetition: kept {share:.1%} of {len(turns)} ShareGPT assistant turns; rejected {len(rejected)}")
    assert share >= 0.98


def test_real_answers_turned_into_loops_are_caught(alpaca_file):
    """The other half of the calibration: real text made degenerate is caught (>= 98%)."""
    answers = [r["output"] for r in json.loads(alpaca_file.read_text())]
    looped = []
    for answer in answers:
        sentence = answer.split(".")[0].strip()
        if len(sentence.split()) >= 4:
            looped.append(answer + " " + (sentence + ". ") * 3)
    caught = sum(find_repetition(t, CFG) is not None for t in looped)
    print(f"\nrepetition: caught {caught} of {len(looped)} real answers with a sentence looping 3 times at the end")
    assert caught / len(looped) >= 0.98


def test_loop_settings_below_the_defaults_are_honoured():
    """Two repeats over six words: the shortcut that looks for a repeated n-gram first must use
    the n-gram length these settings imply (3 words), not the defaults' (8)."""
    from loraforge.gate.repetition import find_repetition_exact, loop_gram

    text = "please stop now please stop now thanks"
    loose = RepetitionConfig(loop_repeats=2, loop_min_words=6)
    assert loop_gram(2, 6) == 3 and loop_gram(3, 12) == 8
    for find in (find_repetition, find_repetition_exact):
        assert "please stop now" in (find(text, loose) or ""), find
        assert find(text, CFG) is None  # the defaults want 3 repeats
