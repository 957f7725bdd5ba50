import pytest

from loraforge.config import LoraforgeConfig, load_config
from loraforge.errors import ConfigError, LoraforgeError


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == LoraforgeConfig()
    assert cfg.model.name == "smollm2-135m-instruct"


def test_yaml_then_flag_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  max_seq_length: 512\n  checks:\n    dedup:\n      near: false\n")
    cfg = load_config(path, {"gate.max_seq_length": 1024, "gate.workers": None})
    assert cfg.gate.max_seq_length == 1024  # the flag wins
    assert cfg.gate.checks.dedup.near is False  # the file's value stays
    assert cfg.gate.workers is None  # an unset flag changes nothing


def test_unknown_key_is_refused_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  max_seq_lenght: 512\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*gate.max_seq_lenght"):
        load_config(path)


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match="gate.max_seq_length"):
        load_config(overrides={"gate.max_seq_length": "long"})


def test_threshold_can_be_switched_off(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  checks:\n    repetition:\n      dup_line_frac: null\n      char_run: null\n")
    cfg = load_config(path)
    assert cfg.gate.checks.repetition.dup_line_frac is None
    assert cfg.gate.checks.repetition.char_run is None


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_error_is_a_loraforge_error():
    assert issubclass(ConfigError, LoraforgeError)


def test_shipped_example_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gate.yaml")
    assert cfg.gate.checks.pii.mode == "off"
