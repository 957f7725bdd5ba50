"""Test data in, or a clear error naming the file and line; bad flags fail before any model loads."""

import json

import pytest

from loraforge.errors import ConfigError, EvalError, InputError
from loraforge.eval import evaluate, read_samples

from .conftest import order_samples, run_cli, write_jsonl


def test_reads_every_format_the_gate_reads(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [
        order_samples(1)[0],
        {"instruction": "Capital of Peru?", "input": "", "output": "Lima"},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]},
        {"prompt": "Say hi", "completion": "hi"},
    ])
    samples = read_samples(path)
    assert [s.reference for s in samples[1:]] == ["Lima", "6", "hi"]
    assert samples[2].prompt_text == "3+3?" and len(samples[2].prompt_messages) == 3  # multi-turn: the last answer is the reference
    assert [s.line for s in samples] == [1, 2, 3, 4]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(order_samples(1)[0]) + "\n\n" + '{"messages": [{"role": "user", "content": "unterminated\n')
    with pytest.raises(EvalError, match=rf"{path}:3: not valid JSON"):
        read_samples(path)


def test_no_final_assistant_turn_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [order_samples(1)[0], {"messages": [{"role": "user", "content": "Hello?"}]}])
    with pytest.raises(EvalError, match=rf"{path}:2: no final assistant turn.*'user'"):
        read_samples(path)


def test_not_a_chat_sample_names_the_field(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(EvalError, match=rf"{path}:1: not a chat sample: unknown format"):
        read_samples(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_samples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="no samples"):
        read_samples(tmp_path / "empty.jsonl")


def test_missing_adapter_is_a_clear_error(tmp_path, orders_test_file):
    with pytest.raises(EvalError, match=r"no adapter to evaluate.*loraforge train --out"):
        evaluate(tmp_path, orders_test_file)


def test_unknown_metric_fails_before_loading_a_model(tmp_path, orders_test_file):
    # tmp_path has no adapter: reaching the model would fail differently
    with pytest.raises(ConfigError, match=r"unknown metric 'rouge_l' for the json task; known: json_valid, json_extractable, field_accuracy"):
        evaluate(tmp_path, orders_test_file, require=["rouge_l>=0.5"])


def test_task_json_needs_json_references(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [order_samples(1)[0], {"prompt": "Capital of Peru?", "completion": "Lima"}])
    with pytest.raises(EvalError, match=rf"{path}:2: --task json needs every reference to be a JSON object"):
        evaluate(tmp_path, path, task="json")
    with pytest.raises(ConfigError, match="--task 'yaml'"):
        evaluate(tmp_path, path, task="yaml")


def test_cli_bad_input_exits_2_with_file_and_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("not json\n")
    assert run_cli(monkeypatch, "eval", tmp_path, "--data", path) == 2
    assert f"error: {path}:1: not valid JSON" in capsys.readouterr().err


def test_cli_eval_help_has_an_example(monkeypatch, capsys):
    assert run_cli(monkeypatch, "eval", "--help") == 0
    out = capsys.readouterr().out
    assert "Example" in out and "--require-better-than-base" in out and "Exit code 3" in out
