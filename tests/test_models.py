import pytest

from loraforge.errors import ModelNotFoundError
from loraforge.models import build_tiny_llama, load_tokenizer, resolve_model


def test_tiny_llama_has_real_tokenizer_and_chat_template(tiny_model_dir, tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], tokenize=False
    )
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>assistant\n4<|im_end|>" in text
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids  # a single special token
    assert tiny_tokenizer.decode(ids) == text  # byte-level BPE round-trips


def test_tiny_llama_runs_forward(tiny_tokenizer):
    import torch

    model, tokenizer = build_tiny_llama()
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_llama3_template_variant():
    _, tokenizer = build_tiny_llama(template="llama3")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|start_header_id|>assistant<|end_header_id|>" in text


def test_hub_id_not_on_disk_says_how_to_provide_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"never downloads.*--local-dir.*--model"):
        resolve_model("meta-llama/Llama-3.1-8B-Instruct")


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_directory_without_model_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model"):
        resolve_model(str(tmp_path))


def test_local_directory_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    assert load_tokenizer(str(tiny_model_dir)).chat_template


@pytest.mark.slow
def test_embedded_default_converts_once_and_answers():
    """The GGUF is dequantized once; the cached copy loads with plain transformers and answers."""
    import torch

    from loraforge.models import load_causal_lm

    directory = resolve_model("smollm2-135m-instruct")
    assert (directory / "model.safetensors").is_file()
    config_text = (directory / "config.json").read_text()
    assert "quantization_config" not in config_text  # later loads never look for the GGUF again
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
