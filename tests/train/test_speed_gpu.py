"""The training speed levers' GPU kernels against the plain path (CUDA only; skipped elsewhere).

Run on the H200 by scripts/gpu_train_speed.sh: torch's flash varlen attention vs SDPA per
sample (GQA, bf16, forward and backward), equal-length rows through SDPA vs flash varlen, Liger's fused loss vs full logits, the offloaded
checkpoint vs no checkpoint, and a whole run with every lever on vs every lever off.
"""

import json

import pytest
import torch

from loraforge.train import attention, memory
from loraforge.train.data import IGNORE
from loraforge.train.loss import ChunkedLinearCrossEntropy, fused_loss_sum, plain_loss_sum
from loraforge.train.recipe import train

from .conftest import KernelCalls, train_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_flash_varlen_equals_sdpa_per_sample_with_gqa():
    torch.manual_seed(0)
    lengths = [700, 1, 333, 2048, 90]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (attention._flash_varlen, lambda *a: attention._sdpa_per_sample(*a[:4], a[5])):
        out = fn(q, k, v, cu, max(lengths), None)
        q.grad = k.grad = v.grad = None
        out.backward(grad)
        results.append((out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()))
    for flash, reference in zip(*results):  # bf16: compare errors relative to the tensor's scale
        assert (flash - reference).abs().max() <= 0.05 * reference.abs().max()
        assert (flash - reference).norm() <= 0.01 * reference.norm()


def test_equal_length_rows_on_gpu_equal_flash_varlen():
    """The whole-rows path (SDPA, cuDNN first) against the flash varlen kernel, 8B head shape."""
    torch.manual_seed(0)
    lengths = [1024, 1024, 1024]
    total = sum(lengths)
    cu = torch.tensor([0, 1024, 2048, 3072], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (32, 8, 8))
    grad = torch.randn(1, total, 32, 128, device="cuda", dtype=torch.bfloat16)
    rows, _ = attention.varlen_attention(None, q, k, v, None, **attention.flat_kwargs(cu, 1024))
    got = [rows.detach().float(), *(g.float() for g in torch.autograd.grad(rows, (q, k, v), grad))]
    flat = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]
    flash = attention._flash_varlen(*flat, cu, 1024, None).unsqueeze(0)
    want = [flash.detach().float(), *(g.float() for g in torch.autograd.grad(flash, (q, k, v), grad))]
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 0.05 * b.abs().max()
        assert (a - b).norm() <= 0.01 * b.norm()


def test_fused_loss_on_gpu_equals_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, 32000, (3000,), device="cuda")
    labels[::7] = IGNORE
    reference = plain_loss_sum(hidden, weight, labels)
    reference.backward()
    expected = hidden.grad.float().clone()
    for fn in (lambda: fused_loss_sum(hidden, weight, labels), lambda: ChunkedLinearCrossEntropy.apply(hidden, weight, labels, 512)):
        hidden.grad = None
        loss = fn()
        loss.backward()
        torch.testing.assert_close(loss.float(), reference.float(), rtol=5e-3, atol=0.5)
        torch.testing.assert_close(hidden.grad.float(), expected, rtol=5e-2, atol=2e-3)


def test_offloaded_checkpoint_on_gpu():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Dropout(0.2), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    grads = []
    for offloaded in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        out = memory.offloaded_checkpoint(layer, x) if offloaded else layer(x)
        (out * out).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_offloaded_layers_fetch_ahead_and_match_on_gpu():
    """Several offloaded layers in a row, two steps: each layer's backward copies the previous
    layer's input back ahead of time, gradients equal the plain run's, and nothing offloaded
    outlives the graph."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128)) for _ in range(4)).cuda()
    x = torch.randn(32, 128, device="cuda", requires_grad=True)
    fetched_ahead = []
    original_fetch = memory._Offloaded.fetch

    def watch(self):
        fetched_ahead.append(self.back is None and self.cpu is not None)
        original_fetch(self)

    grads = []
    memory._Offloaded.fetch = watch
    try:
        for offloaded in (False, True, True):
            layers.zero_grad()
            x.grad = None
            h = x
            for layer in layers:
                h = memory.offloaded_checkpoint(layer, h) if offloaded else layer(h)
            (h * h).sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in layers.parameters()])
    finally:
        memory._Offloaded.fetch = original_fetch
    for plain, offloaded in zip(grads[0], grads[1]):
        torch.testing.assert_close(plain, offloaded)
    for first, second in zip(grads[1], grads[2]):
        torch.testing.assert_close(first, second)
    # per step: 4 fetches started ahead (the last layer's at its own backward, 3 ahead), no second copy
    assert fetched_ahead.count(True) == 8
    assert len(memory._last_offloaded) == 0


def test_run_with_every_lever_matches_the_plain_run_on_gpu(tiny_model_dir, demo_kept, tmp_path):
    off = {"train.attention": "sdpa", "train.fused_loss": False, "train.gradient_checkpointing": False, "train.dtype": "bf16"}
    on = {"train.attention": "auto", "train.fused_loss": True, "train.gradient_checkpointing": True, "train.offload_activations": True, "train.dtype": "bf16"}
    losses = {}
    for name, levers in (("plain", off), ("fast", on)):
        result = train(train_config(tiny_model_dir, demo_kept, tmp_path / name, **levers, **{"train.max_steps": 6}), show_progress=False)
        losses[name] = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses["fast"] == pytest.approx(losses["plain"], rel=2e-2)
    assert attention.available(torch.device("cuda"))


@pytest.mark.parametrize("grouped,recomputed,nf4_kernel", [(False, False, False), (True, False, True), (True, True, True)])
def test_fused_lora_on_nf4_base_equals_peft(tiny_model_dir, grouped, recomputed, nf4_kernel):
    """QLoRA: the fused layer dequantizes the NF4 weight itself (bitsandbytes' path or
    ``train.nf4``'s kernel); loss and LoRA gradients as PEFT's,
    each projection alone or q/k/v and gate/up grouped; ``recomputed``: the fused layers' every
    decoder layer offloaded and recomputed in blocks (the groups' dequantized weights kept from
    the recomputation for its backward)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.train import fused_lora

    ids = torch.randint(5, 200, (2, 64), device="cuda")
    results = []
    for fused in (False, True):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0})
        recompute = fused and recomputed
        if recompute:  # as train.model.wrap_lora does it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        model.train()  # from_pretrained's eval mode would leave checkpointing off
        if fused:
            assert fused_lora.apply(model, nf4_kernel=nf4_kernel)[0] == 14
            assert fused_lora.dequantizer(model).startswith("one Triton kernel" if nf4_kernel else "bitsandbytes")
            if grouped:
                assert fused_lora.group(model) == 4
        if recompute:
            memory.apply(model, memory.MemoryPlan(layers=2, checkpointed=2, offload=True, budget=0, estimate={}), blocks=True)
        dequantized = []
        with pytest.MonkeyPatch.context() as mp:
            plain_dense = fused_lora._dense_weight
            mp.setattr(fused_lora, "_dense_weight", lambda base: dequantized.append(base) or plain_dense(base))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        if fused:
            # per layer: 7 in forward and 7 in backward (but the first layer's q/k/v, whose input
            # needs no gradient without checkpointing); recomputed, 7 + 5 + 2: the recomputation
            # dequantizes q/k/v and gate/up (o and down skip theirs), and those 5 serve their
            # backward too, which dequantizes only o and down
            assert len(dequantized) == (2 * (7 + 5 + 2) if recomputed else 2 * 14 - 3)
        results.append((loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-2, atol=1e-2)
    for name, reference in results[0][1].items():
        # PEFT runs the LoRA product in fp32 (it casts x), the fused layer in bf16: a few % apart
        assert (results[1][1][name] - reference).norm() <= 0.06 * reference.norm() + 1e-6, name


@pytest.mark.parametrize("equal_lengths", [False, True])
def test_kept_attention_on_gpu_is_as_exact_as_no_checkpoint(equal_lengths):
    """Offloaded blocks that keep their attention, bf16, head size 128: cuDNN through SDPA's rows
    (equal lengths) or the flash varlen kernel (unequal). No attention kernel runs again in the
    recomputation, and the LoRA gradients are as close to an fp32 reference (CPU, no
    checkpointing) as those of the bf16 run without checkpointing.

    Not held bitwise equal to that run: on the H200 (torch 2.11) the flash varlen path's
    gradients once differed from it by 0.4% (a bf16 rounding step), while two runs without
    checkpointing were bitwise equal; the attention kernel is not the cause (its no-grad and
    grad-enabled outputs are bitwise equal there, and its backward from replayed outputs matches
    to 5e-6). A wrong kept value (another sample's, a stale one) is off by far more than the
    bf16 error."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from loraforge.models import build_tiny_llama
    from loraforge.train import fused_lora
    from loraforge.train.loss import CausalLMLoss

    lengths = [512, 512, 512] if equal_lengths else [700, 33, 512, 300]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)

    results, calls = {}, {}
    for run, device, dtype, keep in (("fp32", "cpu", torch.float32, False), ("plain", "cuda", torch.bfloat16, False), ("kept", "cuda", torch.bfloat16, True)):
        model, _ = build_tiny_llama(hidden_size=512, num_heads=4, num_kv_heads=2, intermediate_size=1024, num_layers=3, seed=1)
        model = model.to(device, dtype)
        model.set_attn_implementation(attention.register())
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        fused_lora.apply(model)
        fused_lora.group(model)
        if keep:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            memory.apply(model, memory.MemoryPlan(layers=3, checkpointed=3, offload=True, budget=0, estimate={}, kept_attention=True), blocks=True)
        with warnings.catch_warnings(), KernelCalls(attention._KERNELS) as kernels:
            warnings.simplefilter("error", UserWarning)  # "computed again" would be one
            inputs = {"input_ids": ids.to(device), "labels": ids.to(device), "position_ids": positions.to(device)}
            loss = CausalLMLoss(model, True)(**inputs, **attention.flat_kwargs(cu.to(device), max(lengths)))
            loss.backward()
        calls[run] = kernels.calls
        results[run] = (loss.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None})
    assert calls["plain"] == calls["kept"] == 3  # one kernel call per layer, and none again in the recomputation
    torch.testing.assert_close(results["kept"][0], results["plain"][0], rtol=1e-3, atol=1e-3)
    reference = results["fp32"][1]
    assert results["kept"][1].keys() == reference.keys()
    for name, exact in reference.items():
        plain_error = (results["plain"][1][name] - exact).norm()
        kept_error = (results["kept"][1][name] - exact).norm()
        assert kept_error <= 1.5 * plain_error + 1e-3 * exact.norm() + 1e-6, (name, kept_error, plain_error)
    assert len(memory._last_offloaded) == 0


@pytest.mark.parametrize("dtype,nested,storage", [(torch.bfloat16, True, torch.uint8), (torch.float16, True, torch.uint8), (torch.bfloat16, False, torch.uint8), (torch.bfloat16, True, torch.bfloat16)])
def test_nf4_kernel_equals_bitsandbytes_bitwise(dtype, nested, storage):
    """``train.nf4``'s one-kernel dequantization against bitsandbytes' own CUDA path, bitwise:
    double quantization or not, bf16 / fp16 out, packed bytes in uint8 or in FSDP's bf16
    containers; a size whose last program is partial."""
    import bitsandbytes.functional as bnbf

    from loraforge.train import nf4

    torch.manual_seed(0)
    w = torch.randn(1000, 4096 + 64, device="cuda", dtype=dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4", quant_storage=storage)
    assert nf4.covered(packed, state) is None
    assert torch.equal(nf4.dequantize(packed, state), bnbf.dequantize_4bit(packed, state))
