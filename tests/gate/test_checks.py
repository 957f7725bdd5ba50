"""Each check with samples that must pass and samples that must fail, asserting the reason."""

import pytest

from loraforge.config import GateConfig, PiiConfig, RepetitionConfig, TooShortConfig
from loraforge.gate.checks import (
    EmptyResponseCheck,
    LengthCheck,
    PiiCheck,
    RepetitionCheck,
    RoleOrderCheck,
    SpecialTokenCheck,
    TooShortCheck,
    build_checks,
)
from loraforge.gate.verdict import Reason, Sample


def sample(*turns: tuple[str, str]) -> Sample:
    return Sample([{"role": r, "content": c} for r, c in turns], {"file": "t.jsonl", "line": 1})


def qa(answer: str, question: str = "What is it?") -> Sample:
    return sample(("user", question), ("assistant", answer))


def test_empty_response():
    check = EmptyResponseCheck()
    assert check(qa("Paris")) is None
    verdict = check(qa("  \n "))
    assert verdict.code is Reason.EMPTY_RESPONSE and "message 1" in verdict.detail


@pytest.mark.parametrize("answer", ["1", "48", "True", "Negative", "Да", "是", "A"])
def test_too_short_keeps_real_one_token_answers(answer):
    assert TooShortCheck(TooShortConfig())(qa(answer)) is None


@pytest.mark.parametrize("answer", [".", "...", "-", "?!", "—"])
def test_too_short_rejects_answers_without_letters_or_digits(answer):
    assert TooShortCheck(TooShortConfig())(qa(answer)).code is Reason.TOO_SHORT


def test_too_short_configurable_minimums():
    check = TooShortCheck(TooShortConfig(min_words=3))
    assert check(qa("Paris")).code is Reason.TOO_SHORT
    assert check(qa("It is Paris.")) is None
    assert TooShortCheck(TooShortConfig(min_chars=10))(qa("Paris")).code is Reason.TOO_SHORT


@pytest.mark.parametrize(
    "turns",
    [
        (("user", "q"), ("assistant", "a")),
        (("system", "s"), ("user", "q"), ("assistant", "a")),
        (("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")),
    ],
)
def test_role_order_accepts(turns):
    assert RoleOrderCheck()(sample(*turns)) is None


@pytest.mark.parametrize(
    "turns, detail",
    [
        ((("assistant", "a"), ("user", "q")), "message 0: expected 'user'"),
        ((("user", "q"), ("user", "q2"), ("assistant", "a")), "message 1: expected 'assistant' after 'user'"),
        ((("user", "q"), ("system", "s"), ("assistant", "a")), "got 'system'"),
        ((("user", "q"), ("assistant", "a"), ("user", "q2")), "ends with 'user'"),
        ((("system", "s"),), "ends with 'system'"),
    ],
)
def test_role_order_rejects(turns, detail):
    verdict = RoleOrderCheck()(sample(*turns))
    assert verdict.code is Reason.ROLE_ORDER and detail in verdict.detail


def test_special_tokens_of_target_tokenizer_and_other_families(tiny_tokenizer):
    check = build_special_check(tiny_tokenizer)
    assert check(qa("Use <b>bold</b> and a < b and [1] citations.")) is None
    for marker in ["<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "[INST]", "<s>", "<|endoftext|>", "<end_of_turn>"]:
        verdict = check(qa(f"Sure.{marker} More text"))
        assert verdict is not None and verdict.code is Reason.SPECIAL_TOKEN, marker
        assert repr(marker) in verdict.detail
    assert check(sample(("user", "[INST] hi"), ("assistant", "ok"))).detail.startswith("message 0 (user)")


def test_special_tokens_include_added_tokens_of_the_target(embedded_tokenizer):
    check = build_special_check(embedded_tokenizer)
    assert check(qa("see <filename> here")).code is Reason.SPECIAL_TOKEN  # SmolLM2's own added token


def build_special_check(tokenizer) -> SpecialTokenCheck:
    (check,) = [c for c in build_checks(GateConfig(), tokenizer) if isinstance(c, SpecialTokenCheck)]
    return check


def test_repetition_check_on_assistant_turns_only():
    check = RepetitionCheck(RepetitionConfig())
    loop = "I am not sure. " * 6
    assert check(sample(("user", loop), ("assistant", "Fine."))) is None
    assert check(qa(loop)).code is Reason.REPETITION


def test_length_check_counts_with_the_chat_template(tiny_tokenizer):
    check = LengthCheck(tiny_tokenizer, max_seq_length=64)
    ok = qa("Paris.")
    assert check(ok) is None
    rendered = tiny_tokenizer.apply_chat_template(ok.messages, tokenize=False)
    assert ok.meta["num_tokens"] == len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    long_answer = qa("word " * 200)
    assert check(long_answer).code is Reason.TOO_LONG
    long_prompt = sample(("user", "word " * 200), ("assistant", "ok"))
    assert check(long_prompt).code is Reason.NO_SUPERVISED_TOKENS


def test_pii_modes():
    text = "Mail jane.doe@example.com or call +1 415 555 0100 from 192.168.1.20 with key sk-abcdefghijklmnopqrstuvwx"
    assert PiiCheck(PiiConfig(mode="drop"))(qa(text)).code is Reason.PII
    flagged = qa(text)
    assert PiiCheck(PiiConfig(mode="flag"))(flagged) is None
    assert flagged.meta["pii"] == ["api_key", "email", "ip", "phone"]
    redacted = qa(text)
    assert PiiCheck(PiiConfig(mode="redact"))(redacted) is None
    answer = redacted.messages[1]["content"]
    assert "[EMAIL]" in answer and "[PHONE]" in answer and "[IP]" in answer and "[API_KEY]" in answer
    assert "jane.doe" not in answer


@pytest.mark.parametrize("text", ["The year 1999 and 3.14159", "Version 1.2.3.4.5", "Call extension 55", "999.1.1.1 is not an IP"])
def test_pii_no_false_alarms(text):
    assert PiiCheck(PiiConfig(mode="drop"))(qa(text)) is None


def test_checks_can_be_switched_off(tiny_tokenizer):
    cfg = GateConfig.model_validate(
        {"checks": {"empty_response": False, "role_order": False, "too_short": {"enabled": False},
                    "special_token": {"enabled": False}, "repetition": {"enabled": False}, "length": {"enabled": False}}}
    )
    assert build_checks(cfg, tiny_tokenizer) == []
