"""End to end on a tiny trained adapter: eval.json, base = adapter disabled, the CLI's exit codes,
and greedy decoding that batching and left padding do not change."""

import json

import pytest
import torch

from loraforge.eval import evaluate
from loraforge.eval.runner import greedy_generate

from .conftest import run_cli

TOP_KEYS = {"data", "task", "base", "adapter", "examples", "promotion", "timings", "settings"}
JSON_METRICS = {"json_valid", "json_extractable", "field_accuracy", "exact_match", "loss", "perplexity"}


def test_evaluate_writes_eval_json(trained_run, orders_test_file):
    result = evaluate(trained_run, orders_test_file, max_new_tokens=8, examples=3, require=["loss<1000"], require_better_than_base=True)
    written = json.loads((trained_run / "eval.json").read_text())
    assert written == result.to_json() and result.path == trained_run / "eval.json"
    assert set(written) == TOP_KEYS
    assert written["data"]["file"] == str(orders_test_file) and len(written["data"]["sha256"]) == 64
    assert written["data"]["samples"] == written["data"]["loss_samples"] == 6
    assert written["task"] == "json"  # the references are JSON objects
    assert set(written["base"]) == set(written["adapter"]) == JSON_METRICS
    assert written["base"]["loss"] != pytest.approx(written["adapter"]["loss"], abs=1e-4)  # the adapter changed something
    assert written["adapter"]["perplexity"] == pytest.approx(torch.exp(torch.tensor(written["adapter"]["loss"])).item(), rel=1e-5)
    assert len(written["examples"]) == 3
    for example in written["examples"]:
        assert set(example) == {"prompt", "reference", "base", "adapter", "base_correct", "adapter_correct"}
        assert example["prompt"].startswith("Extract the order") and example["reference"].startswith("{")
    assert [c["requirement"] for c in written["promotion"]["checks"]] == ["loss<1000", f"field_accuracy > base ({written['base']['field_accuracy']:.4g})", f"loss < base ({written['base']['loss']:.4g})"]
    assert {"load_s", "loss_s", "generate_base_s", "generate_adapter_s", "total_s", "tokens_per_s"} <= set(written["timings"])
    settings = written["settings"]
    assert (settings["max_new_tokens"], settings["batch_size"], settings["task"], settings["max_seq_length"]) == (8, 16, "auto", 256)
    assert settings["require"] == ["loss<1000"] and settings["require_better_than_base"] is True


def test_base_column_is_the_plain_base_model(trained_run, orders_test_file, tiny_model_dir):
    """`disable_adapter()` really is the base: its loss equals a fresh base model's, adapter-free."""
    from transformers import AutoModelForCausalLM

    from loraforge.eval import runner
    from loraforge.eval.samples import read_samples
    from loraforge.train.batch import collate, token_loss_sum

    run = runner.load_run(trained_run, torch.device("cpu"))  # fp32: the merged path, compared with a CPU model
    tokenized = runner.tokenize_for_loss(run, read_samples(orders_test_file))
    with run.weights("base"):
        via_peft = runner.loss_on_assistant_tokens(run, tokenized, batch_size=4)["loss"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    b = collate([[t] for t in tokenized], run.pad_id)
    with torch.no_grad():
        logits = plain(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    assert via_peft == pytest.approx(float(token_loss_sum(logits, b.labels)) / b.supervised, rel=1e-5)


def test_merged_adapter_pass_equals_peft_unmerged_and_restores_the_weights(trained_run, orders_test_file):
    from loraforge.eval import runner
    from loraforge.eval.samples import read_samples

    run = runner.load_run(trained_run, torch.device("cpu"))  # fp32: the merged path, compared with a CPU model
    tokenized = runner.tokenize_for_loss(run, read_samples(orders_test_file))
    weight = run.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()
    unmerged = runner.loss_on_assistant_tokens(run, tokenized, batch_size=4)["loss"]  # PEFT's own LoRA forward
    with run.weights("adapter"):
        assert not torch.equal(weight, before)  # merged: W + (alpha/r) B A
        merged = runner.loss_on_assistant_tokens(run, tokenized, batch_size=4)["loss"]
    assert merged == pytest.approx(unmerged, rel=1e-5)
    torch.testing.assert_close(weight, before, rtol=0, atol=1e-6)
    with run.weights("base"):
        base = runner.loss_on_assistant_tokens(run, tokenized, batch_size=4)["loss"]
    assert base != pytest.approx(unmerged, rel=1e-4)


def test_cli_impossible_requirement_exits_3_with_the_numbers(trained_run, orders_test_file, monkeypatch, capsys):
    code = run_cli(monkeypatch, "eval", trained_run, "--data", orders_test_file, "--max-new-tokens", "4", "--examples", "2",
                   "--require", "exact_match>=1.01", "--require", "loss>0")
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "error: the adapter does not earn its deployment: exact_match>=1.01 failed (adapter: 0)" in captured.err
    assert "loss>0 failed" not in captured.err
    for header in ("metric", "base", "adapter", "delta", "field_accuracy", "perplexity"):
        assert header in captured.out
    promotion = json.loads((trained_run / "eval.json").read_text())["promotion"]  # written before the verdict
    assert promotion["passed"] is False and [c["passed"] for c in promotion["checks"]] == [False, True]


def test_cli_passing_requirement_exits_0(trained_run, orders_test_file, monkeypatch, capsys):
    assert run_cli(monkeypatch, "eval", trained_run, "--data", orders_test_file, "--task", "text", "--max-new-tokens", "2",
                   "--examples", "0", "--require", "rouge_l>=0") == 0
    written = json.loads((trained_run / "eval.json").read_text())
    assert written["task"] == "text" and set(written["adapter"]) == {"exact_match", "rouge_l", "loss", "perplexity"}
    assert written["examples"] == [] and written["promotion"]["passed"] is True
    assert "promoted" in capsys.readouterr().out


def _sharp_tiny_model():
    """A tiny random Llama with its weights scaled up, so greedy picks vary from token to token."""
    from loraforge.models import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    return model.eval(), tokenizer


def test_greedy_generate_matches_one_at_a_time_and_transformers_generate():
    model, tok = _sharp_tiny_model()
    texts = ["The quick brown fox", "What is the capital of France? The", "1 2 3", "Give three tips for staying healthy: eat well"]
    prompts = [tok(t)["input_ids"] for t in texts]  # different lengths: left padding in the batch
    batched = greedy_generate(model, prompts, tok.pad_token_id, {tok.eos_token_id}, 10, "cpu")
    alone = [greedy_generate(model, [p], tok.pad_token_id, {tok.eos_token_id}, 10, "cpu")[0] for p in prompts]
    reference = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in prompts]
    assert batched == alone == reference
    for batch_size in (1, 3):  # fewer slots than prompts: waiting prompts are prefilled into the batch as rows finish
        assert greedy_generate(model, prompts, tok.pad_token_id, {tok.eos_token_id}, 10, "cpu", batch_size=batch_size) == reference
    assert len(set(map(tuple, batched))) == 4 and all(len(set(b)) > 2 for b in batched)  # not a degenerate model


def test_greedy_generate_stops_rows_independently():
    """A row that stops leaves the batch; the others go on exactly as before."""
    model, tok = _sharp_tiny_model()
    prompts = [tok(t)["input_ids"] for t in ["The quick brown fox", "1 2 3", "Give three tips for staying healthy: eat well"]]
    free = greedy_generate(model, prompts, tok.pad_token_id, {tok.eos_token_id}, 10, "cpu")
    stop = free[1][2]  # the third token of the second row
    expected = [row[: row.index(stop)] if stop in row else row for row in free]
    assert len(expected[1]) == 2 and any(len(row) == 10 for row in expected)
    assert greedy_generate(model, prompts, tok.pad_token_id, {stop}, 10, "cpu") == expected
    done = []
    # two slots: the second row stops after 2 tokens and the third prompt takes its slot mid-way through the first's answer
    assert greedy_generate(model, prompts, tok.pad_token_id, {stop}, 10, "cpu", batch_size=2, on_done=done.append) == expected
    assert sorted(done) == [0, 1, 2] and done[0] == 1
    longest_first = prompts[::-1]  # now the prompt that joins is shorter than the cache it joins
    assert greedy_generate(model, longest_first, tok.pad_token_id, {stop}, 10, "cpu", batch_size=2) == expected[::-1]


def test_refilled_batches_stay_exact_and_narrow(monkeypatch):
    """Many prompts through few slots: answers as one at a time, the cache no wider than one row needs."""
    from loraforge.eval import runner

    model, tok = _sharp_tiny_model()
    texts = ["The quick brown fox", "1 2 3", "Give three tips for staying healthy: eat well", "What is the capital", "a", "def add(a, b):"]
    prompts = [tok(t)["input_ids"] for t in texts]
    free = greedy_generate(model, prompts, tok.pad_token_id, set(), 12, "cpu")
    stops = {free[1][2], free[3][5]}  # rows end at different steps
    expected = [row[: next((k for k, t in enumerate(row) if t in stops), len(row))] for row in free]
    widths = []
    step = runner._step
    monkeypatch.setattr(runner, "_step", lambda model, rows, *a: (widths.append(rows.mask.shape[1]), step(model, rows, *a))[1])
    for batch_size in (2, 4):
        assert greedy_generate(model, prompts, tok.pad_token_id, stops, 12, "cpu", batch_size=batch_size) == expected
    assert max(widths) <= max(map(len, prompts)) + 12
