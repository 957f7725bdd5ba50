"""The recipe on tiny models: normalization, preflight, NaN stop, resume, PEFT, merge."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from loraforge.errors import PreflightError, TrainingDiverged
from loraforge.train.batch import collate, token_loss_sum
from loraforge.train.data import ChatTokenizer, read_messages
from loraforge.train.recipe import train

from .conftest import train_config


def _grads(model, micro_batches):
    model.zero_grad()
    total = sum(b.supervised for b in micro_batches)
    for b in micro_batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        (token_loss_sum(logits, b.labels) / total).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_normalizes_by_all_supervised_tokens(tiny_tokenizer, demo_kept):
    """Uneven micro-batches (1 row + 3 rows) give the gradient of the whole batch at once."""
    from loraforge.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=2)
    tokenize = ChatTokenizer(tiny_tokenizer)
    samples = [tokenize(m) for m, _ in read_messages(demo_kept)[:4]]
    samples[0] = tokenize([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}])  # few tokens
    whole = _grads(model, [collate([[s] for s in samples], 0)])
    split = _grads(model, [collate([[samples[0]]], 0), collate([[s] for s in samples[1:]], 0)])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)
    naive_total = None  # what a per-micro-batch mean would give instead: not equal
    model.zero_grad()
    for mb in ([samples[0]], samples[1:]):
        b = collate([[s] for s in mb], 0)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        (token_loss_sum(logits, b.labels) / b.supervised / 2).backward()
    naive_total = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert not torch.allclose(naive_total, whole, rtol=1e-3)


def test_grad_accum_equals_bigger_micro_batch(tiny_model_dir, demo_kept, tmp_path):
    a = train(train_config(tiny_model_dir, demo_kept, tmp_path / "a", **{"train.micro_batch_size": 1, "train.grad_accum": 2, "train.max_steps": 2}), show_progress=False)
    b = train(train_config(tiny_model_dir, demo_kept, tmp_path / "b", **{"train.micro_batch_size": 2, "train.grad_accum": 1, "train.max_steps": 2}), show_progress=False)
    wa = load_file(a.run_dir / "adapter" / "adapter_model.safetensors")
    wb = load_file(b.run_dir / "adapter" / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)


def test_outputs_and_plain_peft_load(tiny_model_dir, demo_kept, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(train_config(tiny_model_dir, demo_kept, tmp_path / "run"), show_progress=False)
    run = result.run_dir
    assert result.status == "completed" and result.steps == 4
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/chat_template.jinja", "manifest.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["data"]["sha256"]) == 64
    assert manifest["versions"]["peft"] and manifest["hardware"]["device"] == "cpu"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(steps[0]) and "eval_loss" in steps[1]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, run / "adapter")  # plain PEFT, no loraforge
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        tuned = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert not torch.allclose(tuned, plain)  # the adapter learned something


def test_merge_equals_adapter_outputs(tiny_model_dir, demo_kept, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.train.merge import merge

    run = train(train_config(tiny_model_dir, demo_kept, tmp_path / "run"), show_progress=False).run_dir
    merged_dir = merge(run, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora" in k for k in load_file(merged_dir / "model.safetensors"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.lora.target_modules": ["q_proj", "qkv"]}, "target_modules: not linear layers of this model: qkv"),
        ({"train.quantization": "nf4"}, "QLoRA .* needs a CUDA GPU"),
    ],
)
def test_preflight_refuses(tiny_model_dir, demo_kept, tmp_path, overrides, message):
    with pytest.raises(PreflightError, match=message):
        train(train_config(tiny_model_dir, demo_kept, tmp_path / "run", **overrides), show_progress=False)
    assert not (tmp_path / "run" / "adapter").exists()  # nothing was trained


def test_preflight_memory_refusal_names_the_fix(demo_kept, tmp_path):
    """SmolLM2's 49k vocabulary at micro-batch 4096 needs far more than this machine has."""
    result = train(
        train_config("smollm2-135m-instruct", demo_kept, tmp_path / "run", **{"train.micro_batch_size": 4096}),
        dry_run=True, show_progress=False,
    )
    (memory,) = [f for f in result.findings if f.check == "memory"]
    assert memory.level == "block" and "does not fit" in memory.message
    assert "train.micro_batch_size" in memory.fix


def test_alpha_is_a_scale_not_a_shape(tiny_model_dir, demo_kept, tmp_path):
    result = train(train_config(tiny_model_dir, demo_kept, tmp_path / "r", **{"train.lora.r": 128, "train.lora.alpha": 16}), dry_run=True, show_progress=False)
    (alpha,) = [f for f in result.findings if f.check == "alpha"]
    assert alpha.level == "warn" and "rslora" in alpha.fix


def test_nan_loss_stops_and_keeps_last_good_adapter(tmp_path, demo_kept):
    from loraforge.models import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    tokenizer.save_pretrained(tmp_path / "broken")
    with pytest.raises(TrainingDiverged, match=r"step 1: loss nan.*last good weights.*Likely causes"):
        train(train_config(tmp_path / "broken", demo_kept, tmp_path / "run"), show_progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "diverged"
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the bad step was never applied


@pytest.mark.parametrize("bad", ["loss", "gradient"])
@pytest.mark.parametrize("queued", [True, False], ids=["device guard, queued ahead", "host guard"])
def test_a_bad_step_changes_no_weights_even_with_the_next_queued(tiny_model_dir, demo_kept, tmp_path, bad, queued):
    """Step 4 goes bad: a NaN loss (a NaN in a base weight), or a finite loss whose gradient is
    NaN. Queued ahead (as on CUDA), step 5 (a good one) is launched before step 4 is read;
    neither update may reach the adapter, which must be exactly the one of step 3."""
    from loraforge.train.recipe import TrainRun

    settings = {"train.max_steps": 8, "train.scheduler": "constant", "train.checkpoint_every": 1000, "train.eval_fraction": 0.0}
    launched = []

    class Poisoned(TrainRun):
        def _launch_step(self, step):
            launched.append(step - self.step)  # 1: queued before the step before it was read
            base = next(p for name, p in self.model.named_parameters() if not p.requires_grad and "layers.1.mlp" in name)
            lora = next(p for p in self.model.parameters() if p.requires_grad)
            with torch.no_grad():
                if step == 3 and bad == "loss":
                    self.kept = base.view(-1)[0].item()
                    base.view(-1)[0] = float("nan")
                elif step == 4 and bad == "loss":  # the 5th step is good again
                    base.view(-1)[0] = self.kept
            if step == 3 and bad == "gradient":
                self.hook = lora.register_hook(lambda grad: torch.full_like(grad, float("nan")))
            elif step == 4 and bad == "gradient":
                self.hook.remove()
            return super()._launch_step(step)

    run = Poisoned(train_config(tiny_model_dir, demo_kept, tmp_path / "bad", **settings), show_progress=False)
    run.setup()
    run.run_ahead = run.device_guard = queued  # on the CPU queuing ahead is off unless asked
    what = r"loss nan" if bad == "loss" else r"gradient norm nan \(loss [0-9.]+\)"
    with pytest.raises(TrainingDiverged, match=rf"step 4: {what}.*adapter of step 3"):
        run.train()
    assert (1 in launched) == queued  # with the device guard, step 5 was queued before step 4 was read
    good = train(train_config(tiny_model_dir, demo_kept, tmp_path / "good", **settings | {"train.max_steps": 3}), show_progress=False)
    assert good.steps == 3
    bad_adapter = load_file(tmp_path / "bad" / "adapter" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "good" / "adapter" / "adapter_model.safetensors")
    assert bad_adapter.keys() == ref.keys()
    assert all(torch.equal(bad_adapter[k], ref[k]) for k in ref)  # the weights of step 3, exactly


class _Stopped(Exception):
    pass


def _guard_stop(losses, warmup, on_device, norms=None):
    """Where the loss guard trips on ``losses`` (and gradient ``norms``; step index or None), and
    the running average then."""
    from types import SimpleNamespace

    from loraforge.train.recipe import TrainRun

    class Probe(TrainRun):
        def __init__(self):  # only what the guards read
            self.cfg = SimpleNamespace(spike_warmup=warmup, spike_factor=1.5)
            self.ema, self.device, self._ema_dev, self._tripped = None, torch.device("cpu"), None, None
            self.optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None)

        def _diverged(self, loss, step, grad_norm):
            raise _Stopped

    run = Probe()
    for step, (loss, norm) in enumerate(zip(losses, norms or [1.0] * len(losses))):
        if on_device:
            before = run._guard(torch.tensor(loss, dtype=torch.float32), torch.tensor(norm), step)
            if run._tripped.item():
                return step, before.item()
        else:
            average = run.ema
            try:
                run._check_loss(loss, step, norm)
            except _Stopped:
                return step, average
    return None, run.ema if not on_device else run._ema_dev.item()


@pytest.mark.parametrize(
    ("losses", "norms", "warmup", "stop"),
    [
        ([5.0, 5.0, 5.0, 30.0, 5.0, 5.0], None, 3, 3),  # the spike at the first step the rule covers
        ([5.0, 5.0, 5.0, 30.0, 5.0, 5.0], None, 4, None),  # one step earlier: taken into the average instead
        ([5.0, float("nan"), 5.0], None, 10, 1),  # non-finite: whatever the warm-up
        ([float("inf")], None, 10, 0),
        ([30.0, 5.0, 5.0], None, 0, None),  # no average yet at the first step: no spike
        ([5.0, 5.0, 5.0], [1.0, float("inf"), 1.0], 10, 1),  # a finite loss, a gradient that overflowed
    ],
)
def test_the_device_guard_rule_is_the_host_rule(losses, norms, warmup, stop):
    host, device = _guard_stop(losses, warmup, False, norms), _guard_stop(losses, warmup, True, norms)
    assert host[0] == device[0] == stop
    assert host[1] == pytest.approx(device[1], nan_ok=True) if host[1] is not None else math.isnan(device[1])


def test_steps_queued_ahead_leave_evaluations_and_checkpoints_as_they_were(tiny_model_dir, demo_kept, tmp_path):
    """Queued ahead (as on CUDA) or not: the same evaluations, checkpoints, losses and adapter."""
    from loraforge.train.recipe import TrainRun

    settings = {"train.max_steps": 7, "train.eval_every": 2, "train.checkpoint_every": 3, "train.scheduler": "constant"}
    runs = []
    for ahead in (True, False):
        launched = []

        class Recorded(TrainRun):
            def _launch_step(self, step):
                launched.append(step - self.step)  # 1: queued before the step before it was read
                return super()._launch_step(step)

        out = tmp_path / str(ahead)
        run = Recorded(train_config(tiny_model_dir, demo_kept, out, **settings), show_progress=False)
        run.setup()
        run.run_ahead = run.device_guard = ahead
        run.train()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
        runs.append((launched, rows, checkpoints, load_file(out / "adapter" / "adapter_model.safetensors")))
    (ahead_launched, ahead_rows, ahead_ckpts, ahead_adapter), (_, rows, ckpts, adapter) = runs
    assert ahead_launched.count(1) == 2  # steps 2 and 6 were queued early (1-based), nothing else
    assert [r.get("eval_loss") for r in ahead_rows] == [r.get("eval_loss") for r in rows]
    assert [r["loss"] for r in ahead_rows] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert ahead_ckpts == ckpts
    assert all(torch.equal(ahead_adapter[k], adapter[k]) for k in adapter)


def _cli_train(model_dir, data, out, *extra):
    args = [sys.executable, "-m", "loraforge.cli", "train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--max-steps", "24", "--set", "train.checkpoint_every=3", "--set", "train.micro_batch_size=1",
            "--set", "train.lora.dropout=0.1", "--set", "train.max_seq_length=512", *extra]
    return args


def test_sigkill_and_resume_ends_with_the_same_adapter(tiny_model_dir, demo_kept, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli_train(tiny_model_dir, demo_kept, tmp_path / "straight"), check=True, capture_output=True, env=env, timeout=300)
    victim = subprocess.Popen(_cli_train(tiny_model_dir, demo_kept, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "killed" / "checkpoints").glob("step-0000006")):
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()  # it really died mid-run
    subprocess.run(_cli_train(tiny_model_dir, demo_kept, tmp_path / "killed", "--resume"), check=True, capture_output=True, env=env, timeout=300)
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # the resumed run continues the metrics without gaps or repeats


@pytest.mark.slow
def test_embedded_default_loss_falls(tmp_path):
    """A few real steps of SmolLM2-135M on the demo task, on CPU: the loss goes down."""
    from loraforge.demo.data import write_demo_data

    write_demo_data(tmp_path / "data.jsonl", n=48)
    config = train_config(
        "smollm2-135m-instruct", tmp_path / "data.jsonl", tmp_path / "run",
        **{"train.max_steps": 6, "train.micro_batch_size": 4, "train.max_seq_length": 384, "train.eval_fraction": 0.0, "train.lr": 1e-3},
    )
    result = train(config, show_progress=False)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"\nembedded default, 6 steps on CPU: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]


def test_early_stopping_on_eval_loss(tiny_model_dir, demo_kept, tmp_path):
    config = train_config(
        tiny_model_dir, demo_kept, tmp_path / "run",
        **{"train.lr": 1e-12, "train.eval_every": 1, "train.early_stopping_patience": 1, "train.max_steps": 10},
    )
    result = train(config, show_progress=False)
    assert result.status == "early_stopped" and result.steps == 2  # no improvement at the 2nd evaluation
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "early_stopped"


def test_prometheus_endpoint_during_training(tiny_model_dir, demo_kept, tmp_path):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _cli_train(tiny_model_dir, demo_kept, tmp_path / "run", "--metrics-port", str(port))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body, deadline = "", time.time() + 120
        while time.time() < deadline and "loraforge_train_loss " not in body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        for name in ("loraforge_train_loss", "loraforge_train_learning_rate", "loraforge_train_grad_norm", "loraforge_train_tokens_per_second"):
            assert f"\n{name} " in body, name
    finally:
        proc.kill()
        proc.wait()
