import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.config import load_config
from loraforge.demo.data import PLANTED_REASONS, write_demo_data
from loraforge.errors import InputError
from loraforge.gate import run_gate
from loraforge.gate.pipeline import jsonl_line, loads


def gate(tmp_path, inputs, tokenizer, **overrides):
    cfg = load_config(overrides={"gate.workers": 1, "gate.max_seq_length": 512, **overrides})
    report = run_gate(inputs, tmp_path / "out", cfg, tokenizer=tokenizer)
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    return report, kept, rejected


def test_demo_data_planted_samples_are_rejected_for_the_right_reason(tmp_path, tiny_tokenizer):
    data = tmp_path / "demo.jsonl"
    counts = write_demo_data(data, n=120)
    report, kept, rejected = gate(tmp_path, [data], tiny_tokenizer)
    assert report.input == counts["good"] + counts["planted"]
    assert report.kept == counts["good"] == len(kept)
    assert Counter(r["reason"] for r in rejected) == Counter(PLANTED_REASONS)
    assert report.reasons == dict(Counter(PLANTED_REASONS))


def test_outputs_and_report_fields(tmp_path, tiny_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "What is 2+2?", "completion": "4"}\n'
        "not json\n"
        '{"prompt": "What is 2+2?", "completion": "4"}\n'
    )
    report, kept, rejected = gate(tmp_path, [data], tiny_tokenizer)
    assert kept[0]["messages"][1] == {"role": "assistant", "content": "4"}
    assert kept[0]["source"] == {"file": str(data), "line": 1}
    assert kept[0]["num_tokens"] > 5
    malformed, duplicate = rejected
    assert malformed == {"reason": "malformed_json", "detail": malformed["detail"], "source": {"file": str(data), "line": 2}, "raw": "not json"}
    assert "line 2, column 1" in malformed["detail"]
    assert duplicate["record"] == {"prompt": "What is 2+2?", "completion": "4"}
    assert f"{data}:1" in duplicate["detail"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["input"] == 3 and saved["kept"] == 1 and saved["rejected"] == 2
    assert saved["files"][0]["sha256"] and len(saved["files"][0]["sha256"]) == 64
    assert saved["thresholds"]["max_seq_length"] == 512
    assert saved["timings"]["wall_s"] > 0
    assert saved["examples"]["malformed_json"][0]["source"]["line"] == 2


def test_mixed_formats_and_files_in_one_run(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Blue"}]))
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}]), b)
    report, kept, _ = gate(tmp_path, [a, b], tiny_tokenizer)
    assert report.kept == 2
    assert kept[1]["source"] == {"file": str(b), "row": 0}
    assert [f.kept for f in report.files] == [1, 1]


def test_output_is_identical_for_any_number_of_workers(tmp_path, tiny_tokenizer):
    data = tmp_path / "demo.jsonl"
    write_demo_data(data, n=300)
    outputs = []
    for workers in (1, 2, 3):
        cfg = load_config(overrides={"gate.workers": workers, "gate.chunk_size": 7, "gate.max_seq_length": 512})
        out = tmp_path / f"w{workers}"
        report = run_gate([data], out, cfg, tokenizer=tiny_tokenizer)
        outputs.append(((out / "kept.jsonl").read_bytes(), (out / "rejected.jsonl").read_bytes(), report.reasons, report.examples))
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0][2]  # the demo data has rejections of several kinds


def test_eval_overlap_decontaminates(tmp_path, tiny_tokenizer):
    question = "Explain in one paragraph why the sky looks blue during the day and red at sunset please"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": question, "completion": "Rayleigh scattering."}) + "\n")
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"prompt": "Hey! " + question + "?", "completion": "Because of scattering."}) + "\n"
        + json.dumps({"prompt": "Why is grass green?", "completion": "Chlorophyll."}) + "\n"
    )
    report, kept, rejected = gate(tmp_path, [data], tiny_tokenizer, **{"gate.checks.eval_overlap.files": [str(eval_file)]})
    assert [r["reason"] for r in rejected] == ["eval_overlap"]
    assert "13-gram" in rejected[0]["detail"]
    assert kept[0]["messages"][0]["content"] == "Why is grass green?"


def test_pii_flag_mode_lists_kinds_in_kept(tmp_path, tiny_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Email me", "completion": "Write to ops@example.org today."}) + "\n")
    _, kept, _ = gate(tmp_path, [data], tiny_tokenizer, **{"gate.checks.pii.mode": "flag"})
    assert kept[0]["pii"] == ["email"]


def test_unusable_input_raises_before_writing(tmp_path, tiny_tokenizer):
    with pytest.raises(InputError, match="no such file"):
        run_gate([tmp_path / "nope.jsonl"], tmp_path / "out", tokenizer=tiny_tokenizer)
    assert not (tmp_path / "out").exists()


def test_gzipped_jsonl_input(tmp_path, tiny_tokenizer):
    import gzip

    data = tmp_path / "d.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write(json.dumps({"prompt": "Capital of Peru?", "completion": "Lima"}) + "\n")
    report, kept, _ = gate(tmp_path, [data], tiny_tokenizer)
    assert report.kept == 1 and kept[0]["source"]["line"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _outcome(parse, line):
    try:
        return "value", repr(parse(line))  # repr: NaN is not equal to itself
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return type(exc).__name__, str(exc)


@given(json_values, st.booleans())
@settings(max_examples=300, deadline=None)
def test_loads_gives_what_json_loads_gives(value, ascii_only):
    line = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    assert _outcome(loads, line) == _outcome(json.loads, line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"id": 123456789012345678901234567890, "prompt": "a"}',  # orjson would read a float
        b'{"id": -9223372036854775809}',
        b'{"x": NaN, "y": -Infinity}',
        b'\xef\xbb\xbf{"prompt": "a"}',  # a byte order mark
        '{"prompt": "a"}'.encode("utf-16"),
        b'{"s": "\\ud800 lone"}',
        b'{"s": "\xff"}',
        b'{"a": 1, "a": 2}',
        b"[1e400]",
        b'{"a": }',
        b'{"a": "tab\tinside"}',
        b"",
        '{"prompt": "a str"}',
    ],
)
def test_loads_keeps_json_loads_values_and_errors_where_orjson_differs(line):
    assert _outcome(loads, line) == _outcome(json.loads, line)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_jsonl_line_is_one_line_of_the_same_value(value):
    line = jsonl_line({"messages": value, "source": {"file": "f\u2028.jsonl", "line": 1}})
    text = line.decode("utf-8")
    assert text.endswith("\n") and len(text.splitlines()) == 1
    assert not any(c in text for c in "\u2028\u2029\x85")
    assert json.loads(text) == {"messages": value, "source": {"file": "f\u2028.jsonl", "line": 1}}


def test_a_lone_surrogate_is_rejected_by_name_not_a_crash(tmp_path, tiny_tokenizer):
    """JSON may escape half a surrogate pair ("\\ud800"): the standard library decodes it to a
    string no tokenizer or UTF-8 writer takes. The record is rejected, naming the field."""
    data = tmp_path / "s.jsonl"
    data.write_bytes(b'{"prompt": "Say hi \\ud800", "completion": "Hi."}\n{"prompt": "Say hi \\ud83d\\ude00", "completion": "Hi!"}\n')
    report, kept, rejected = gate(tmp_path, [data], tiny_tokenizer)
    assert report.input == 2 and report.kept == 1 and kept[0]["messages"][0]["content"] == "Say hi \U0001f600"
    assert rejected[0]["reason"] == "schema" and rejected[0]["detail"].startswith("prompt: holds a lone surrogate (\\ud800")
    assert rejected[0]["source"]["line"] == 1
