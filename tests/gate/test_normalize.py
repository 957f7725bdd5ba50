import pytest

from loraforge.gate.normalize import normalize
from loraforge.gate.verdict import Reason, Reject

USER_ASSISTANT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": USER_ASSISTANT}, USER_ASSISTANT),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, USER_ASSISTANT),
        ({"instruction": "Q", "input": "", "output": "A"}, USER_ASSISTANT),
        ({"prompt": "Q", "completion": "A"}, USER_ASSISTANT),
        (
            {"instruction": "Translate", "input": "Hallo", "output": "Hello"},
            [{"role": "user", "content": "Translate\n\nHallo"}, {"role": "assistant", "content": "Hello"}],
        ),
        (
            {"system": "Be brief.", "prompt": "Q", "completion": "A"},
            [{"role": "system", "content": "Be brief."}, *USER_ASSISTANT],
        ),
        (  # OpenAI content parts
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "assistant", "content": "A"}]},
            USER_ASSISTANT,
        ),
        (  # parquet rows of mixed files carry null columns of the other formats
            {"instruction": None, "output": None, "messages": USER_ASSISTANT},
            USER_ASSISTANT,
        ),
    ],
)
def test_formats_normalize_to_messages(record, expected):
    assert normalize(record) == expected


@pytest.mark.parametrize(
    "record, field",
    [
        ([1, 2], "record: expected a JSON object"),
        ({"question": "Q", "answer": "A"}, "unknown format: keys ['answer', 'question']"),
        ({"messages": "hi"}, "messages: expected a list"),
        ({"messages": []}, "messages: is empty"),
        ({"messages": [{"role": "user"}]}, "messages[0].content: missing"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: unknown role 'tool'"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content: expected a string, got null"),
        ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value: expected a string, got int"),
        ({"instruction": "Q"}, "output: missing"),
        ({"instruction": 5, "output": "A"}, "instruction: expected a string, got int"),
        ({"prompt": "Q"}, "completion: missing"),
        ({"instruction": "  ", "output": "A"}, "message 0 (user): content is empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]: only text content parts",
        ),
    ],
)
def test_schema_rejections_name_the_field(record, field):
    verdict = normalize(record)
    assert isinstance(verdict, Reject)
    assert verdict.code is Reason.SCHEMA
    assert field in verdict.detail
