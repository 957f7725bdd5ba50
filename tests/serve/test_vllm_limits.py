"""Adapters checked against vLLM's LoRA limits (where they go beyond one GPU)."""

import json
import logging

import pytest

from loraforge.serve.adapters import vllm_problems, warn_if_not_vllm_servable


def test_a_plain_all_linear_adapter_passes():
    assert vllm_problems({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}) == []
    assert vllm_problems({"r": 8, "target_modules": "all-linear"}) == []


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"r": 12, "target_modules": ["q_proj"]}, "rank [12]"),
        ({"r": 16, "rank_pattern": {"down_proj": 4}, "target_modules": ["down_proj"]}, "rank [4, 16]"),
        ({"r": 16, "target_modules": ["q_proj", "embed_tokens"]}, "target modules ['embed_tokens']"),
        ({"r": 16, "target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
        ({"r": 16, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 16, "target_modules": ["q_proj"], "bias": "lora_only"}, "biases"),
    ],
)
def test_each_vllm_limit_is_named(config, reason):
    problems = vllm_problems(config)
    assert len(problems) == 1 and reason in problems[0]


def test_loading_warns_with_the_way_out(tmp_path, caplog):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12, "target_modules": ["q_proj"]}))
    with caplog.at_level(logging.WARNING, logger="loraforge.serve"):
        assert warn_if_not_vllm_servable(tmp_path, "orders")
    assert "adapter orders will not serve on vLLM: rank [12]" in caplog.text and "loraforge merge" in caplog.text
