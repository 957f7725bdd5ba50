"""Training in several processes: data sharding, the strategy choice, and real 2-process runs
on CPU (torchrun, gloo) that must end with the single-process adapter, DDP and FSDP alike,
and resume across a change in the number of processes."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from loraforge.train import preflight as pf
from loraforge.train.distributed import shard_micro_batches
from loraforge.train.launch import Dist, check_launch
from loraforge.train.recipe import TrainRun, train

from .conftest import train_config

# One process with micro-batch 1 x grad_accum 8 and two processes with micro-batch 1 x
# grad_accum 4 take the same 8 rows a step. The demo data packs into 27 rows: the 4th step,
# the last of the epoch, has 3, so one rank runs a padding pass.
SINGLE = {"train.micro_batch_size": 1, "train.grad_accum": 8}
PER_RANK = {"train.micro_batch_size": 1, "train.grad_accum": 4}


# ---- sharding and the global step ----------------------------------------------------------


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (1, 2), (5, 4), (3, 8), (0, 2), (6, 1)])
def test_shards_are_disjoint_complete_deterministic_and_even(n, world):
    micro = [[10 * i, 10 * i + 1] for i in range(n)]
    shards = [shard_micro_batches(micro, rank, world) for rank in range(world)]
    assert shards == [shard_micro_batches(micro, rank, world) for rank in range(world)]
    rows = [ids for shard in shards for ids in shard if ids]
    assert sorted(rows) == sorted(micro) and len(rows) == len(micro)  # each micro-batch exactly once
    assert len({len(s) for s in shards}) == 1  # the same number of passes on every rank ([] pads)


def _data_run(config, world, rank):
    run = TrainRun(config, processes=world)
    run.dist = Dist(world, rank, rank, world)
    run.setup(dry_run=True)
    return run


def test_a_global_step_takes_the_single_process_rows(tiny_model_dir, demo_kept, tmp_path):
    """Every step of every epoch: the ranks' rows together are the single-process step's rows."""
    single = TrainRun(train_config(tiny_model_dir, demo_kept, tmp_path / "one", **SINGLE, **{"train.max_steps": None, "train.epochs": 2}))
    single.setup(dry_run=True)
    ranks = [_data_run(train_config(tiny_model_dir, demo_kept, tmp_path / "two", **PER_RANK, **{"train.max_steps": None, "train.epochs": 2}), 2, r) for r in (0, 1)]
    assert ranks[0].total_steps == single.total_steps == 2 * single.steps_per_epoch
    assert len(single.train_rows) % 8 == 3  # the last step of an epoch is short
    last = single.steps_per_epoch - 1
    assert ranks[1].micro_batches(last)[-1] == [] and len(ranks[0].micro_batches(last)) == len(ranks[1].micro_batches(last))
    for step in range(single.total_steps):
        expected = sorted(r for ids in single.micro_batches(step) for r in ids)
        shares = [[r for ids in run.micro_batches(step) for r in ids] for run in ranks]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == expected
        assert ranks[0].supervised_tokens(ranks[0].global_micro_batches(step)) == sum(
            single.batch(single.train_rows, ids, single.train_samples).supervised for ids in single.micro_batches(step)
        )


# ---- strategy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama8b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.bench.train_smoke import LLAMA3_8B

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))


def _plan(model, monkeypatch, free_bytes, world=2, **overrides):
    from loraforge.config import load_config

    cfg = load_config(overrides={"train.micro_batch_size": 1, **overrides}).train
    monkeypatch.setattr(pf, "available_memory", lambda device: free_bytes)
    return pf.plan_strategy(model, cfg, torch.bfloat16, torch.device("cpu"), 2048, True, world, 1)


def test_strategy_ddp_when_the_model_fits_else_fsdp(llama8b_meta, monkeypatch):
    from loraforge.config import load_config

    cfg = load_config(overrides={"train.micro_batch_size": 1}).train
    ddp = sum(pf.estimate_memory(llama8b_meta, cfg, torch.bfloat16, 2048, 1, True).values())
    fsdp = sum(pf.fsdp_memory(llama8b_meta, cfg, torch.bfloat16, pf.estimate_memory(llama8b_meta, cfg, torch.bfloat16, 2048, 1, True), 2).values())
    assert fsdp < 0.7 * ddp  # half the weights and optimizer state, plus two layers in flight

    strategy, memory, chosen, parts = _plan(llama8b_meta, monkeypatch, int(ddp / 0.9) + 2**30)
    assert chosen == "ddp" and memory.level == "ok" and strategy.message.startswith("DDP over 2 processes: the whole model fits")
    assert "global batch 1 x 1 x 2 = 2 rows" in strategy.message

    strategy, memory, chosen, parts = _plan(llama8b_meta, monkeypatch, int((ddp + fsdp) / 2 / 0.9))
    assert chosen == "fsdp" and memory.level == "ok" and "does not fit on one GPU" in strategy.message
    assert parts["weights"] < pf.estimate_memory(llama8b_meta, cfg, torch.bfloat16, 2048, 1, True)["weights"] * 0.6

    strategy, memory, chosen, _ = _plan(llama8b_meta, monkeypatch, int((ddp + fsdp) / 2 / 0.9), **{"train.distributed": "ddp"})
    assert chosen == "ddp" and memory.level == "block" and "train.distributed: fsdp" in memory.fix

    _, memory, chosen, _ = _plan(llama8b_meta, monkeypatch, int(ddp / 0.9) + 2**30, **{"train.distributed": "fsdp"})
    assert chosen == "fsdp" and memory.level == "ok"

    _, memory, chosen, _ = _plan(llama8b_meta, monkeypatch, int(fsdp / 2))
    assert chosen == "fsdp" and memory.level == "block" and "more GPUs" in memory.fix


def test_dry_run_plans_n_processes_without_starting_them(tiny_model_dir, demo_kept, tmp_path):
    args = ["train", "--dry-run", "--gpus", "2", "--model", str(tiny_model_dir), "--data", str(demo_kept), "--out", str(tmp_path / "run"),
            "--set", "train.max_seq_length=512", "--set", "train.micro_batch_size=2"]
    done = subprocess.run([sys.executable, "-m", "loraforge.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "strategy" in out and "DDP over 2 processes" in out and "= 4 rows" in out
    assert not (tmp_path / "run" / "adapter").exists()


def test_gpus_must_match_what_torchrun_started():
    from loraforge.errors import ConfigError

    check_launch(None, Dist(4, 1, 1, 4))
    check_launch(4, Dist(8, 5, 1, 4))  # 2 nodes x 4: --gpus counts this node's processes
    with pytest.raises(ConfigError, match="torchrun started 4 processes"):
        check_launch(2, Dist(4, 0, 0, 4))


# ---- metrics -------------------------------------------------------------------------------------


def test_rank_zero_serves_every_ranks_gpu_numbers(tmp_path):
    from loraforge.train.report import MetricsSink

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = MetricsSink(tmp_path / "metrics.jsonl", port, ranks=2)
    try:
        sink.write({"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 10.0, "gpu_memory_allocated_bytes": 100,
                    "gpu_memory_allocated_bytes_per_rank": [100, 200], "gpu_utilization_per_rank": [0.5, None]})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        sink.close()
    assert 'loraforge_gpu_memory_allocated_bytes{rank="0"} 100.0' in body
    assert 'loraforge_gpu_memory_allocated_bytes{rank="1"} 200.0' in body
    assert 'loraforge_gpu_utilization_ratio{rank="0"} 0.5' in body
    assert 'loraforge_gpu_utilization_ratio{rank="1"} 0.0' in body  # not measured: stays 0


# ---- real runs: 2 CPU processes (torchrun, gloo) against 1 ------------------------------------

STEPS = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2}


def _torchrun(model_dir, data, out, *extra):
    """``python -m loraforge.cli train --gpus 2``: relaunches itself under torchrun (CPU: gloo).
    Gradient checkpointing on, as on a GPU (the reference run has it off: same numbers)."""
    sets = {**PER_RANK, **STEPS, "train.max_seq_length": 512, "train.warmup_ratio": 0.0, "train.gradient_checkpointing": "true"}
    args = [sys.executable, "-m", "loraforge.cli", "train", "--gpus", "2", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--lr", "1e-3", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _assert_same_adapter(a_dir, b_dir, atol=1e-5):
    a, b = load_file(a_dir / "adapter" / "adapter_model.safetensors"), load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < atol, f"max abs difference {worst}"
    assert max(float(v.abs().max()) for v in a.values()) > 1e-3  # the adapter moved: the comparison means something


def _losses(run_dir):
    return [(r["step"], r["loss"], r.get("eval_loss"), r["tokens"], r["grad_norm"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _cut_to_step_2(src, dst):
    """A copy of a finished run as if killed after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-0000004")
    shutil.rmtree(dst / "adapter")


@contextlib.contextmanager
def _one_thread():
    """In-process runs with one intra-op thread, like each torchrun worker (OMP_NUM_THREADS=1):
    on 2 busy cores a tiny model runs several times faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, demo_kept, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    with _one_thread():
        train(train_config(tiny_model_dir, demo_kept, out, **SINGLE, **STEPS), show_progress=False)
    return out


def test_two_ddp_processes_train_the_single_process_adapter_and_resume_in_one(tiny_model_dir, demo_kept, tmp_path, single_run):
    two = tmp_path / "two"
    done = _torchrun(tiny_model_dir, demo_kept, two)
    assert done.stdout.count("preflight") == 1  # rank 0 reports for all
    _assert_same_adapter(two, single_run)
    for (step, loss, eval_loss, tokens, grad_norm), ref in zip(_losses(two), _losses(single_run), strict=True):
        assert (step, tokens) == (ref[0], ref[3]) and loss == pytest.approx(ref[1], rel=1e-6)
        # the gradient's scale, which AdamW would hide from the adapter: normalization over all ranks
        assert grad_norm == pytest.approx(ref[4], rel=1e-5)
        assert eval_loss == (ref[2] and pytest.approx(ref[2], rel=1e-6))  # eval rows shared out and summed
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["hardware"]["processes"] == 2 and manifest["hardware"]["strategy"] == "ddp"
    assert (two / "adapter" / "adapter_config.json").is_file() and (two / "loss.png").is_file()

    resumed = tmp_path / "resumed-in-one"  # the 2-process checkpoint, continued by 1 process
    _cut_to_step_2(two, resumed)
    with _one_thread():
        train(train_config(tiny_model_dir, demo_kept, resumed, **SINGLE, **STEPS), resume=True, show_progress=False)
    _assert_same_adapter(resumed, single_run)
    assert [s for s, *_ in _losses(resumed)] == [1, 2, 3, 4]


def test_fsdp_shards_resume_a_single_process_checkpoint_in_two(tiny_model_dir, demo_kept, tmp_path, single_run):
    """FSDP2 on CPU: per-layer sharded base and LoRA, the optimizer state of a 1-process
    checkpoint split over 2 ranks, gathered again at the end: the same adapter."""
    resumed = tmp_path / "resumed-in-two"
    _cut_to_step_2(single_run, resumed)
    _torchrun(tiny_model_dir, demo_kept, resumed, "--set", "train.distributed=fsdp", "--resume")
    _assert_same_adapter(resumed, single_run)
    assert json.loads((resumed / "manifest.json").read_text())["hardware"]["strategy"] == "fsdp"
    assert [s for s, *_ in _losses(resumed)] == [1, 2, 3, 4]


QLORA_FSDP_WORKER = '''
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from loraforge.config import load_config
from loraforge.train import distributed
from loraforge.train.launch import Dist
from loraforge.train.model import wrap_lora

model_dir = sys.argv[1]
ctx = Dist.from_env()
device = distributed.init(ctx)
cfg = load_config(overrides={"train.quantization": "nf4", "train.lora.r": 8}).train


def qlora():  # what load_base builds for FSDP: NF4 in bf16 containers
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map={"": "cpu"}, dtype=torch.bfloat16)
    torch.manual_seed(0)
    return wrap_lora(base, cfg, checkpointing=True)


ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
model = qlora()
assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
engine = distributed.wrap(model, "fsdp", ctx, device)
x = ids[ctx.rank : ctx.rank + 1]  # one row each; the mean of both ranks' mean losses = the whole batch's
engine(input_ids=x, labels=x).loss.backward()
sharded = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
if ctx.rank == 0:
    ref = qlora()
    ref(input_ids=ids, labels=ids).loss.backward()
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(sharded[n], p.grad, rtol=2e-2, atol=1e-4)
    print("QLORA FSDP OK", len(sharded))
distributed.shutdown(ctx)
'''


def test_qlora_base_shards_with_fsdp_on_cpu(tiny_model_dir, tmp_path):
    """The 4-bit base (bf16 containers) under FSDP2, per decoder layer: frozen NF4 weights and
    trainable LoRA in one group, the quantization state restored after each all-gather.
    Needs bitsandbytes (its CPU backend); the GPU run is the benchmark's 70B case."""
    pytest.importorskip("bitsandbytes")
    worker = tmp_path / "worker.py"
    worker.write_text(QLORA_FSDP_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker), str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and "QLORA FSDP OK 28" in done.stdout, (done.stdout + done.stderr)[-4000:]
