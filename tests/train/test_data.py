"""Label masking token by token, packing bounds and boundaries."""

import random

import pytest
import torch

from loraforge.train.batch import collate
from loraforge.train.data import IGNORE, ChatTokenizer, TokenizedSample, pack

CONVERSATION = [
    {"role": "system", "content": "Answer in JSON."},
    {"role": "user", "content": "Order: two mugs to Lima."},
    {"role": "assistant", "content": '{"item": "mug", "quantity": 2}'},
    {"role": "user", "content": "And one lamp?"},
    {"role": "assistant", "content": '{"item": "lamp", "quantity": 1}'},
]


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_labels_cover_exactly_the_assistant_answers(which, tiny_tokenizer, request):
    tokenizer = tiny_tokenizer if which == "tiny" else request.getfixturevalue("embedded_tokenizer")
    sample = ChatTokenizer(tokenizer)(CONVERSATION)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(sample.input_ids) == text  # the model's own template, tokenized once
    # token by token: a token is supervised iff it lies inside an assistant answer
    supervised_runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        assert label in (IGNORE, token)
        if label != IGNORE:
            current.append(token)
        elif current:
            supervised_runs.append(tokenizer.decode(current))
            current = []
    if current:
        supervised_runs.append(tokenizer.decode(current))
    assert supervised_runs == [
        '{"item": "mug", "quantity": 2}<|im_end|>\n',
        '{"item": "lamp", "quantity": 1}<|im_end|>\n',
    ]


def test_pack_bounds_and_completeness():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    rows = pack(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (len(rows) * 512) > 0.9  # first-fit decreasing packs tightly
    with pytest.raises(ValueError, match="over max_len"):
        pack([600], 512)


def test_packed_samples_do_not_attend_to_each_other():
    from loraforge.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=1)
    model.eval()
    a = TokenizedSample([5, 6, 7, 8, 9], [IGNORE, 6, 7, 8, 9])
    b = TokenizedSample([10, 11, 12], [IGNORE, 11, 12])
    batch = collate([[a, b], [b]], pad_id=0)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.labels[0, 5].item() == IGNORE  # the second sample's first token is never a target
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        alone_a = model(torch.tensor([a.input_ids])).logits
        alone_b = model(torch.tensor([b.input_ids])).logits
    torch.testing.assert_close(packed[0, :5], alone_a[0])
    torch.testing.assert_close(packed[0, 5:], alone_b[0])
    torch.testing.assert_close(packed[1, :3], alone_b[0])  # padded row: real tokens unaffected
    assert torch.isfinite(packed).all()  # padding rows attend to themselves, never NaN
