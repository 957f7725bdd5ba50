"""Tiny random Llama-architecture models with a real tokenizer and chat template, for fast tests.

The tokenizer is a real byte-level BPE trained in-process (well under a second) on a small
built-in corpus, with ChatML special tokens and a ChatML chat template, so chat rendering,
special-token handling and label masking behave exactly as with a released model. A
``llama3``-style template is available to test template mismatches.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Give three tips for staying healthy: eat well, sleep enough, exercise daily.
What is the capital of France? The capital of France is Paris.
Translate the sentence into French. Summarize the following paragraph in one sentence.
{"name": "Alice", "quantity": 3, "item": "blue mug", "city": "Berlin"}
def add(a, b):\n    return a + b\n
1 2 3 4 5 6 7 8 9 0 + - * / = ( ) [ ] { } < > . , ; : ! ? ' " _ # @ % & $
system user assistant You are a helpful assistant. Answer briefly and precisely.
"""


def build_tiny_tokenizer(template: str = "chatml", vocab_size: int = 512):
    """A trained byte-level BPE tokenizer with the special tokens and chat template of ``template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat_template, specials, eos = _TEMPLATES[template]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        pad_token=specials[0],
        bos_token=specials[1] if template == "llama3" else None,
        additional_special_tokens=[t for t in specials if t not in (eos, specials[0])],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(
    out_dir: Path | str | None = None,
    template: str = "chatml",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
):
    """A random-weight Llama (a few hundred thousand parameters) and its tokenizer.

    With ``out_dir`` both are saved there (a directory any ``--model`` flag accepts);
    returns ``(model, tokenizer)``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer
