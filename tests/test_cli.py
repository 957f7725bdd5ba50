"""The CLI as a user runs it: a real subprocess."""

import json
import subprocess
import sys

import pytest

COMMANDS = ["gate", "train", "merge", "eval", "serve", "ask", "doctor", "report", "demo-data", "demo", "model", "bench"]


def loraforge(*args, check=False):
    return subprocess.run([sys.executable, "-m", "loraforge.cli", *args], capture_output=True, text=True, check=check, timeout=300)


def test_help_lists_every_command():
    out = loraforge("--help").stdout
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", ["gate", "train", "merge", "eval", "serve", "ask", "doctor", "report", "demo-data", "demo", "model", "bench gate", "bench serve", "bench train", "bench train-distributed"])
def test_each_command_help_has_an_example(command):
    result = loraforge(*command.split(), "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout


def test_gate_runs_and_exits_zero(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Capital of Peru?", "completion": "Lima"}\n{"oops": 1}\n')
    result = loraforge("gate", str(data), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "schema" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["kept"], report["rejected"]) == (1, 1)


def test_gate_on_unusable_input_fails_with_a_clear_message(tmp_path, tiny_model_dir):
    result = loraforge("gate", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir))
    assert result.returncode == 2
    assert "missing.jsonl: no such file" in result.stderr


def test_bad_config_value_fails_naming_the_key(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    result = loraforge("gate", str(data), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir), "--pii", "maybe")
    assert result.returncode == 2
    assert "gate.checks.pii.mode" in result.stderr


def test_demo_data_is_deterministic(tmp_path):
    loraforge("demo-data", "--out", str(tmp_path / "a.jsonl"), "--samples", "50", check=True)
    loraforge("demo-data", "--out", str(tmp_path / "b.jsonl"), "--samples", "50", check=True)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
