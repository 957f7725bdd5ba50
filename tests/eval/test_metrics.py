"""Metrics are pure functions of (prediction, reference): known values, JSON typing, normalization."""

import json

import pytest

from loraforge.eval.metrics import (
    detect_task, extract_json_object, field_accuracy, json_equal, json_exact_match, json_extractable, json_valid,
    lcs_length, mean_scores, metric_names, per_example, rouge_l, text_exact_match,
)

REF = json.dumps({"customer": "Hana", "item": "bike helmet", "quantity": 8, "city": "Oslo"})


@pytest.mark.parametrize("answer, valid", [
    (REF, True),
    ("  " + REF + "\n", True),  # surrounding whitespace is still one JSON object
    ("```json\n" + REF + "\n```", False),  # fenced: extractable, not valid
    ("Sure! " + REF, False),
    ("[1, 2]", False),  # JSON, but not an object
    ('"a string"', False),
    ("{'customer': 'Hana'}", False),  # Python dict syntax
    ("", False),
])
def test_json_valid_is_strict(answer, valid):
    assert json_valid(answer) == float(valid)


@pytest.mark.parametrize("answer", [
    REF, "```json\n" + REF + "\n```", "```\n" + REF + "```", "Sure! Here it is: " + REF + " Anything else?",
    "{broken {\"a\": 1}",  # the first '{' does not start an object; the second does
])
def test_json_extractable_finds_fenced_and_embedded_objects(answer):
    assert json_extractable(answer) == 1.0
    assert extract_json_object(answer) is not None


def test_json_extractable_rejects_answers_without_an_object():
    assert json_extractable("no json here") == 0.0
    assert json_extractable("```json\n[1, 2]\n```") == 0.0


def test_field_accuracy_counts_matching_keys_with_json_types():
    assert field_accuracy(REF, REF) == 1.0
    wrong_type = json.dumps({"customer": "Hana", "item": "bike helmet", "quantity": "8", "city": "Oslo"})
    assert field_accuracy(wrong_type, REF) == 0.75  # "8" is not 8
    missing = json.dumps({"customer": "Hana", "city": "Oslo", "extra": 1})
    assert field_accuracy(missing, REF) == 0.5  # extra keys cost nothing, missing ones count as wrong
    assert field_accuracy(json.dumps({"quantity": 8.0}), json.dumps({"quantity": 8})) == 1.0  # 8 and 8.0 are one JSON number
    assert field_accuracy(json.dumps({"flag": 1}), json.dumps({"flag": True})) == 0.0  # true is not 1
    assert field_accuracy("```json\n" + REF + "\n```", REF) == 0.0  # invalid answers score 0


def test_field_accuracy_needs_an_object_reference():
    with pytest.raises(ValueError, match="JSON object as reference"):
        field_accuracy(REF, "plain text")


def test_json_equal_nested():
    assert json_equal({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2}]})
    assert not json_equal({"a": [1, 2]}, {"a": [2, 1]})
    assert not json_equal({"a": None}, {"a": 0})
    assert not json_equal(0, False)


def test_json_exact_match_compares_parsed_objects():
    reordered = json.dumps({"city": "Oslo", "quantity": 8, "item": "bike helmet", "customer": "Hana"}, indent=2)
    assert json_exact_match(reordered, REF) == 1.0  # key order and whitespace do not matter
    assert json_exact_match(REF.replace("8", '"8"'), REF) == 0.0
    assert json_exact_match(REF[:-1], REF) == 0.0


def test_text_exact_match_normalizes_whitespace_only():
    assert text_exact_match("  Paris\n is  the capital ", "Paris is the capital") == 1.0
    assert text_exact_match("paris is the capital", "Paris is the capital") == 0.0
    assert text_exact_match("", "   ") == 1.0


@pytest.mark.parametrize("a, b, n", [("abcbdab", "bdcaba", 4), ("", "abc", 0), ("abc", "abc", 3), ("abc", "def", 0)])
def test_lcs_length(a, b, n):
    assert lcs_length(list(a), list(b)) == n == lcs_length(list(b), list(a))


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat was found under the bed", "the cat was under the bed", 2 * (6 / 7) * 1.0 / (6 / 7 + 1.0)),  # LCS 6: P 6/7, R 1
    ("police killed the gunman", "the gunman killed police", 0.5),  # LCS 2 ("killed police" / "the gunman"): P = R = 0.5
    ("The Cat", "the cat", 1.0),  # lowercased
    ("dog", "the cat", 0.0),
    ("", "", 1.0),
    ("", "the cat", 0.0),
])
def test_rouge_l_known_values(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_detect_task():
    assert detect_task([REF, '{"a": 1}']) == "json"
    assert detect_task([REF, "Lima"]) == "text"
    assert detect_task(["[1]"]) == "text"
    assert detect_task([]) == "text"


def test_per_example_and_means():
    rows = per_example("json", [REF, "nope"], [REF, REF])
    assert rows[0] == {"json_valid": 1.0, "json_extractable": 1.0, "field_accuracy": 1.0, "exact_match": 1.0}
    assert rows[1] == {"json_valid": 0.0, "json_extractable": 0.0, "field_accuracy": 0.0, "exact_match": 0.0}
    assert mean_scores(rows, "json")["field_accuracy"] == 0.5
    assert metric_names("text") == ("exact_match", "rouge_l", "loss", "perplexity")
