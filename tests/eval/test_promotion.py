"""The promotion gate: requirement parsing, checks against numbers, better-than-base, the error."""

import pytest

from loraforge.errors import ConfigError, LoraforgeError, PromotionFailed
from loraforge.eval.promotion import Promotion, Requirement, check_known, decide, parse_requirement

BASE = {"json_valid": 0.1, "json_extractable": 0.4, "field_accuracy": 0.2, "exact_match": 0.0, "loss": 2.5, "perplexity": 12.2}
ADAPTER = {"json_valid": 1.0, "json_extractable": 1.0, "field_accuracy": 0.9, "exact_match": 0.75, "loss": 0.4, "perplexity": 1.5}


@pytest.mark.parametrize("text, expected", [
    ("exact_match>=0.8", Requirement("exact_match", ">=", 0.8)),
    (" loss < 1.5 ", Requirement("loss", "<", 1.5)),
    ("rouge_l>.5", Requirement("rouge_l", ">", 0.5)),
    ("perplexity<=2e1", Requirement("perplexity", "<=", 20.0)),
    ("json_valid==1", Requirement("json_valid", "==", 1.0)),
])
def test_parse_requirement(text, expected):
    assert parse_requirement(text) == expected


@pytest.mark.parametrize("text", ["exact_match", "exact_match=>0.8", "exact_match>=", ">=0.8", "exact_match>=high", "exact_match!=0.8", "a>=1 b>=2"])
def test_malformed_requirement_says_the_expected_form(text):
    with pytest.raises(ConfigError, match="expected METRIC OP NUMBER"):
        parse_requirement(text)


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(ConfigError) as info:
        check_known([parse_requirement("acuracy>=0.8")], "json")
    message = str(info.value)
    assert "'acuracy'" in message
    for name in ("json_valid", "json_extractable", "field_accuracy", "exact_match", "loss", "perplexity"):
        assert name in message
    with pytest.raises(ConfigError, match="rouge_l"):
        check_known([parse_requirement("field_accuracy>=0.8")], "text")  # a json metric on a text task


@pytest.mark.parametrize("requirement, passed", [
    ("exact_match>=0.75", True), ("exact_match>0.75", False), ("exact_match>=0.8", False),
    ("loss<0.5", True), ("loss<=0.4", True), ("loss<0.4", False), ("json_valid==1", True), ("field_accuracy==0.8", False),
])
def test_requirements_against_the_adapter(requirement, passed):
    promotion = decide([parse_requirement(requirement)], False, "json", BASE, ADAPTER)
    assert promotion.passed is passed
    assert promotion.checks[0].requirement == requirement
    assert promotion.checks[0].value == ADAPTER[parse_requirement(requirement).metric]


def test_better_than_base_needs_primary_metric_and_loss():
    checks = decide([], True, "json", BASE, ADAPTER).checks
    assert [c.passed for c in checks] == [True, True]
    assert checks[0].requirement == "field_accuracy > base (0.2)" and checks[0].value == 0.9
    worse_loss = {**ADAPTER, "loss": 3.0}
    assert decide([], True, "json", BASE, worse_loss).passed is False
    text_base, text_adapter = {"exact_match": 0, "rouge_l": 0.5, "loss": 2.0, "perplexity": 7.4}, {"exact_match": 0, "rouge_l": 0.5, "loss": 1.0, "perplexity": 2.7}
    checks = decide([], True, "text", text_base, text_adapter).checks
    assert checks[0].requirement.startswith("rouge_l > base") and not checks[0].passed  # a tie is not better


def test_no_requirements_pass():
    promotion = decide([], False, "json", BASE, ADAPTER)
    assert promotion.passed and promotion.to_json() == {"passed": True, "checks": []}
    promotion.raise_if_failed()


def test_failure_raises_promotion_failed_with_the_numbers_and_exit_code_3():
    promotion = decide([parse_requirement("exact_match>=0.8"), parse_requirement("loss<1")], True, "json", BASE, {**ADAPTER, "field_accuracy": 0.1})
    assert promotion.to_json()["passed"] is False
    with pytest.raises(PromotionFailed) as info:
        promotion.raise_if_failed()
    message = str(info.value)
    assert "exact_match>=0.8 failed (adapter: 0.75)" in message
    assert "field_accuracy > base (0.2) failed (adapter: 0.1)" in message
    assert "loss<1" not in message  # passed checks are not listed as failures
    assert isinstance(info.value, LoraforgeError) and info.value.exit_code == 3 != LoraforgeError.exit_code


def test_promotion_json_shape():
    promotion = Promotion(decide([parse_requirement("exact_match>=0.8")], False, "json", BASE, ADAPTER).checks)
    assert promotion.to_json() == {"passed": False, "checks": [{"requirement": "exact_match>=0.8", "value": 0.75, "passed": False}]}
