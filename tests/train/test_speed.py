"""The training speed levers (issue 7), each against the plain path it replaces, on CPU.

padding-free rows + varlen attention vs padded rows + block mask; the chunked fused loss vs
full logits; the memory planner's arithmetic; the offloaded checkpoint vs no checkpoint; and
whole runs with every lever on vs every lever off (same losses, same adapter). The GPU
kernels (flash varlen, Liger) are checked the same way on the H200: scripts/gpu_train_speed.sh.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from loraforge.train import attention, memory
from loraforge.train.batch import collate, collate_flat
from loraforge.train.data import IGNORE, ChatTokenizer, read_messages
from loraforge.train.loss import CausalLMLoss, ChunkedLinearCrossEntropy, plain_loss_sum
from loraforge.train.recipe import train

from .conftest import KernelCalls, train_config


def _lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False))
    peft_model.train()
    return peft_model


def _loss_and_grads(model, batch, fused=False):
    model.zero_grad()
    loss = CausalLMLoss(model, fused)(input_ids=batch.input_ids, labels=batch.labels, **batch.model_kwargs())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def samples(tiny_tokenizer, demo_kept):
    tokenize = ChatTokenizer(tiny_tokenizer)
    return [tokenize(m) for m, _ in read_messages(demo_kept)[:7]]


def test_flat_rows_with_varlen_attention_equal_padded_rows_with_masks(samples):
    """The same 7 samples packed into 3 rows: one flat row through the varlen attention gives
    the loss and LoRA gradients of padded rows through SDPA with block masks."""
    from loraforge.models import build_tiny_llama

    rows = [samples[0:3], samples[3:5], samples[5:7]]
    padded = collate(rows, 0)
    flat = collate_flat(rows)
    assert flat.input_ids.shape == (1, padded.real_tokens) and flat.real_tokens == padded.real_tokens
    assert flat.supervised == padded.supervised
    assert flat.cu_seqlens.tolist()[-1] == padded.real_tokens and len(flat.cu_seqlens) == 8
    assert flat.max_len == max(len(s.input_ids) for s in samples)

    model, _ = build_tiny_llama(seed=3)
    reference = _loss_and_grads(_lora(model), padded)
    model, _ = build_tiny_llama(seed=3)
    model.set_attn_implementation(attention.register())
    varlen = _loss_and_grads(_lora(model), flat)
    torch.testing.assert_close(varlen[0], reference[0], rtol=1e-5, atol=1e-5)
    assert varlen[1].keys() == reference[1].keys() and len(varlen[1]) > 0
    for name in reference[1]:
        torch.testing.assert_close(varlen[1][name], reference[1][name], rtol=1e-4, atol=1e-5)


def test_varlen_attention_keeps_samples_apart():
    """Changing one sample's tokens changes no other sample's outputs (no attention across)."""
    from loraforge.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=4)
    model.set_attn_implementation(attention.register())
    ids = torch.randint(5, 200, (1, 20))
    cu = torch.tensor([0, 6, 13, 20], dtype=torch.int32)
    positions = torch.cat([torch.arange(6), torch.arange(7), torch.arange(7)])[None]
    kwargs = attention.flat_kwargs(cu, 7)
    with torch.no_grad():
        before = model(input_ids=ids, position_ids=positions, **kwargs).logits
        changed = ids.clone()
        changed[0, 6:13] = torch.randint(5, 200, (7,))
        after = model(input_ids=changed, position_ids=positions, **kwargs).logits
    torch.testing.assert_close(after[0, :6], before[0, :6])
    torch.testing.assert_close(after[0, 13:], before[0, 13:])
    assert not torch.allclose(after[0, 6:13], before[0, 6:13])
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=ids, position_ids=positions)


def _attention_inputs(lengths, heads=4, kv_heads=2, dim=8, device="cpu", dtype=torch.float32):
    """transformers' layout: q (1, H, T, D), k/v (1, H_kv, T, D); and the samples' bounds."""
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, dim, device=device, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def test_equal_length_samples_take_whole_rows_with_the_same_result():
    """Samples of one length are attended as whole rows (one batched SDPA call); the output and
    gradients are those of attending each sample on its own, and samples stay apart."""
    torch.manual_seed(0)
    q, k, v, cu = _attention_inputs([5, 5, 5])
    out, _ = attention.varlen_attention(None, q, k, v, None, **attention.flat_kwargs(cu, 5))
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]
    reference = attention._sdpa_per_sample(*flat, cu, None)
    assert out.shape == (1, 15, 4, 8)
    torch.testing.assert_close(out[0], reference)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(reference.sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    # a later sample's tokens never reach an earlier one (and the other way round)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    k2[:, :, 5:10] += 1.0
    v2[:, :, 5:10] -= 1.0
    changed, _ = attention.varlen_attention(None, q2, k2, v2, None, **attention.flat_kwargs(cu, 5))
    torch.testing.assert_close(changed[0, :5], out[0, :5].detach())
    torch.testing.assert_close(changed[0, 10:], out[0, 10:].detach())
    assert not torch.allclose(changed[0, 5:10], out[0, 5:10].detach())


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_fused_loss_equals_full_logits(weight_grad):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_grad)
    labels = torch.randint(0, 50, (37,))
    labels[[0, 5, 36]] = IGNORE
    expected = plain_loss_sum(hidden, weight, labels)
    expected.backward()
    grads = hidden.grad.clone(), (weight.grad.clone() if weight_grad else None)
    hidden.grad = None
    weight.grad = None
    fused = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, 8)  # 5 chunks, the last short
    (fused * 2).backward()  # the incoming gradient scales both
    torch.testing.assert_close(fused, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 2 * grads[0], rtol=1e-4, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(weight.grad, 2 * grads[1], rtol=1e-4, atol=1e-5)


def test_fused_loss_module_equals_logits_module(samples):
    from loraforge.models import build_tiny_llama

    batch = collate([samples[:3], samples[3:6]], 0)
    model, _ = build_tiny_llama(seed=5)
    plain = _loss_and_grads(_lora(model), batch, fused=False)
    model, _ = build_tiny_llama(seed=5)
    fused = _loss_and_grads(_lora(model), batch, fused=True)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter_fp32", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_fused_lora_equals_peft(samples, adapter_fp32, grouped, monkeypatch):
    """Same loss and LoRA gradients as PEFT's forward, fp32 adapters (PEFT's default) or not,
    each projection on its own or q/k/v and gate/up as groups (one call per group)."""
    from loraforge.models import build_tiny_llama
    from loraforge.train import fused_lora

    batch = collate([samples[:3], samples[3:6]], 0)
    calls = {"single": 0, "group": 0}
    single, group = fused_lora.LoraLinearFunction.forward, fused_lora.LoraGroupFunction.forward

    def count(kind, forward):
        def counted(ctx, *args):
            calls[kind] += 1
            return forward(ctx, *args)

        return staticmethod(counted)

    monkeypatch.setattr(fused_lora.LoraLinearFunction, "forward", count("single", single))
    monkeypatch.setattr(fused_lora.LoraGroupFunction, "forward", count("group", group))
    results = []
    for fused in (False, True):
        model, _ = build_tiny_llama(seed=8)
        model = _lora(model)
        if not adapter_fp32:
            model = model.to(torch.float64)  # adapters in the model's dtype; exact comparison
        if fused:
            count_, skipped = fused_lora.apply(model)
            assert count_ == 14 and skipped == {}  # 7 linear layers x 2 decoder layers
            if grouped:
                assert fused_lora.group(model) == 4  # q/k/v and gate/up of 2 decoder layers
        results.append(_loss_and_grads(model, batch))
        groups = {m._loraforge_group for m in model.modules() if getattr(m, "_loraforge_group", None)}
        assert all(g.x is None and not g.pending for g in groups)  # nothing held after the step
    # per decoder layer: q/k/v and gate/up as 2 group calls + o and down alone, or 7 alone
    assert calls == ({"single": 4, "group": 4} if grouped else {"single": 14, "group": 0})
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[1][1].keys() == results[0][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-4, atol=1e-5)


def test_grouped_projections_answer_each_input_and_any_call_order():
    """A group computes its outputs for the tensor it is called with: projections called in
    another order, or on different tensors, give the outputs and gradients each would give
    alone; a forward of the attention module starts with an empty group."""
    from loraforge.models import build_tiny_llama
    from loraforge.train import fused_lora

    def run(grouped):
        model, _ = build_tiny_llama(seed=8)
        model = _lora(model)
        fused_lora.apply(model)
        if grouped:
            assert fused_lora.group(model) == 4
        attn = model.get_base_model().model.layers[0].self_attn
        torch.manual_seed(1)
        x1, x2 = torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 5, 64, requires_grad=True)
        ys = [attn.v_proj(x1), attn.q_proj(x2), attn.k_proj(x2), attn.v_proj(x2), attn.k_proj(x1), attn.q_proj(x1)]
        shared = attn.q_proj._loraforge_group
        if grouped:  # v's output for x1 is still waiting: the module's next forward drops it
            assert shared.x is x1 and len(shared.pending) == 1 and shared is attn.v_proj._loraforge_group
            for hook in attn._forward_pre_hooks.values():  # what the attention's forward runs first
                hook(attn, ())
            assert shared.x is None and not shared.pending
        sum((y * torch.arange(y.numel()).view_as(y).sin()).sum() for y in ys).backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return [y.detach() for y in ys], grads | {"x1": x1.grad, "x2": x2.grad}

    alone, grouped = run(False), run(True)
    for y_alone, y_grouped in zip(alone[0], grouped[0]):
        torch.testing.assert_close(y_grouped, y_alone, rtol=1e-5, atol=1e-6)
    assert grouped[1].keys() == alone[1].keys()
    for name in alone[1]:
        torch.testing.assert_close(grouped[1][name], alone[1][name], rtol=1e-5, atol=1e-6)


def test_lora_scale_is_rounded_once():
    """fp32 adapters, bf16 compute: s B is rounded to bf16 once, as the GEMM's alpha would."""
    from loraforge.train import fused_lora

    B = torch.randn(64, 8)
    torch.testing.assert_close(fused_lora._scaled(B, 16 / 6, torch.bfloat16), (B.double() * (16 / 6)).to(torch.bfloat16), rtol=0, atol=0)


def test_fused_lora_leaves_what_it_does_not_cover_to_peft():
    from loraforge.models import build_tiny_llama
    from loraforge.train import fused_lora

    model, _ = build_tiny_llama(seed=8)
    model = _lora(model, dropout=0.1)
    assert fused_lora.apply(model) == (0, {"dropout": 14})


# ---- the memory planner ---------------------------------------------------------------------

GB = 1024**3
PER_TOKEN = memory.LayerBytes(full=100_000, checkpointed=8_000)
FIXED = {"weights": 10 * GB}


def test_planner_spends_the_budget_on_keeping_activations():
    """More budget -> fewer layers recomputed; the plan always fits; extremes as expected."""
    tokens, layers = 8192, 32
    roomy = memory.plan(FIXED, PER_TOKEN, layers, tokens, 100 * GB)
    assert roomy.checkpointed == 0 and not roomy.offload and roomy.total <= 100 * GB
    previous = 0
    for budget_gb in (40, 30, 20, 15, 13):
        p = memory.plan(FIXED, PER_TOKEN, layers, tokens, budget_gb * GB)
        assert p.total <= budget_gb * GB, p.describe()
        assert p.checkpointed >= previous and not p.offload
        previous = p.checkpointed
    assert 0 < memory.plan(FIXED, PER_TOKEN, layers, tokens, 20 * GB).checkpointed < layers
    # recomputing everything still does not fit: the inputs go to CPU memory
    tight = memory.plan(FIXED, PER_TOKEN, layers, tokens, int(10.85 * GB))
    assert tight.checkpointed == layers and tight.offload and tight.total <= 10.85 * GB
    assert "offloaded" in tight.describe() and "recompute all 32 layers" in tight.describe()
    # the switches force the plan whatever the budget
    assert memory.plan(FIXED, PER_TOKEN, layers, tokens, 100 * GB, checkpointing=True).checkpointed == layers
    assert memory.plan(FIXED, PER_TOKEN, layers, tokens, 11 * GB, checkpointing=False).checkpointed == 0
    assert not memory.plan(FIXED, PER_TOKEN, layers, tokens, int(10.85 * GB), offload=False).offload
    assert memory.plan(FIXED, PER_TOKEN, layers, tokens, 100 * GB, checkpointing=True, offload=True).offload


def test_planner_takes_model_dtype_adapters_only_when_fp32_ones_do_not_fit():
    """train.adapter_dtype null: fp32 adapters whenever the plan fits with them; the model's dtype
    (bf16: 8 bytes a LoRA parameter instead of 16) when the budget holds the run only that way."""
    from loraforge.config import TrainConfig
    from loraforge.models import build_tiny_llama
    from loraforge.train import preflight as pf

    model, _ = build_tiny_llama(seed=1)
    cfg = TrainConfig(micro_batch_size=1)
    cpu = torch.device("cpu")

    def plan(budget_bytes, **update):
        c = cfg.model_copy(update={"memory_budget_gib": budget_bytes / GB, **update})
        return pf.plan_memory(model, c, torch.bfloat16, cpu, 64, True, True)

    roomy = plan(10 * GB)
    assert roomy.adapter_dtype == "fp32" and roomy.checkpointed == 0
    fp32 = pf.estimate_memory(model, cfg.model_copy(update={"adapter_dtype": "fp32"}), torch.bfloat16, 64, 1, False, True, True)
    bf16 = pf.estimate_memory(model, cfg.model_copy(update={"adapter_dtype": "model"}), torch.bfloat16, 64, 1, False, True, True)
    assert bf16["lora_and_optimizer"] * 2 == fp32["lora_and_optimizer"]
    tightest_fp32 = plan(1, adapter_dtype="fp32")  # every layer recomputed (no offloading on CPU): its floor
    assert tightest_fp32.checkpointed == model.config.num_hidden_layers
    between = tightest_fp32.total - fp32["lora_and_optimizer"] // 4  # under fp32's floor, over bf16's
    chosen = plan(between)
    assert chosen.adapter_dtype == "model" and chosen.total <= between
    assert "model's dtype" in chosen.describe()
    assert plan(between, adapter_dtype="fp32").adapter_dtype == "fp32"  # an explicit setting stays


def test_planner_on_the_8b_shape():
    """Llama-3-8B, 8,192 tokens a micro-batch, bf16: the H200's 139 GiB keeps every activation;
    an 18 GiB budget recomputes every layer (and offloads); 40 GiB sits between."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.bench.train_smoke import LLAMA3_8B
    from loraforge.config import load_config
    from loraforge.train import preflight as pf

    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
    cfg = load_config(overrides={"train.micro_batch_size": 2, "train.lora.r": 32, "train.lora.alpha": 64}).train

    def plan_for(budget):
        return pf.plan_memory(meta, cfg.model_copy(update={"memory_budget_gib": budget}), torch.bfloat16, torch.device("cpu"), 4096, fused_loss=True, flat=True)

    assert plan_for(125).checkpointed == 0
    middle = plan_for(40)
    assert 0 < middle.checkpointed < 32
    lean = plan_for(20)
    assert lean.checkpointed == 32 and not lean.offload  # CPU: offloading is a CUDA feature
    fused = pf.estimate_memory(meta, cfg, torch.bfloat16, 4096, 2, True, fused_loss=True, flat=True)
    plain = pf.estimate_memory(meta, cfg, torch.bfloat16, 4096, 2, True)
    assert fused["logits"] < plain["logits"] / 5 and fused["attention_mask"] == 0


def test_plan_counts_the_kept_attention_only_when_offloading():
    """Kept attention values come back with an offloaded input (one layer's, fetched ahead): the
    offloaded plan counts them and says so; a plan that offloads nothing keeps none."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    plain, keeping = memory.layer_bytes(config, 2), memory.layer_bytes(config, 2, keep_attention=True)
    assert plain.kept == 0 and keeping.kept == (2 * 4096 + 2 * 1024) * 2 + 4 * 32
    tokens = 8192
    tight = memory.plan(FIXED, keeping, 32, tokens, int(10.85 * GB))
    assert tight.offload and tight.kept_attention and "attention's values" in tight.describe()
    assert tight.total - memory.plan(FIXED, plain, 32, tokens, int(10.85 * GB)).total == keeping.kept * tokens
    roomy = memory.plan(FIXED, keeping, 32, tokens, 100 * GB)
    assert not roomy.offload and not roomy.kept_attention


def test_offloaded_checkpoint_gives_the_gradients_of_no_checkpoint(samples):
    """Dropout on: the recomputation must draw the same masks (RNG state restored)."""
    from loraforge.models import build_tiny_llama

    batch = collate([samples[:3], samples[3:6]], 0)
    grads = []
    for checkpointed in (False, True):
        model, _ = build_tiny_llama(seed=6)
        model = _lora(model, dropout=0.3)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            memory.apply(model, memory.MemoryPlan(layers=2, checkpointed=1, offload=True, budget=0, estimate={}))
        torch.manual_seed(11)
        grads.append(_loss_and_grads(model, batch))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name in grads[0][1]:
        torch.testing.assert_close(grads[1][1][name], grads[0][1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_lean_recompute_skips_the_down_projection_and_keeps_the_gradients(samples, offload, grouped, monkeypatch):
    """Fused LoRA layers, every decoder layer recomputed: in the recomputation the MLP's down
    projection leaves its base matmul out (its value feeds only the residual add), and with
    offloading (attention and MLP blocks recomputed apart) the attention's output projection
    too; the loss and every LoRA gradient equal those of the run without checkpointing."""
    from loraforge.models import build_tiny_llama
    from loraforge.train import fused_lora

    batch = collate([samples[:3], samples[3:6]], 0)
    unused_calls = []
    plain_forward = fused_lora.LoraLinearFunction.forward

    def counting_forward(ctx, x, A, B, scale, base, value_unused=False):
        unused_calls.append(value_unused)
        return plain_forward(ctx, x, A, B, scale, base, value_unused)

    monkeypatch.setattr(fused_lora.LoraLinearFunction, "forward", staticmethod(counting_forward))
    results = []
    for checkpointed in (False, True):
        model, _ = build_tiny_llama(seed=6)
        model = _lora(model)
        assert fused_lora.apply(model)[0] == 14
        if grouped:
            assert fused_lora.group(model) == 4
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            memory.apply(model, memory.MemoryPlan(layers=2, checkpointed=2, offload=offload, budget=0, estimate={}), blocks=True)
        unused_calls.clear()
        results.append(_loss_and_grads(model, batch))
    # o and down alone (q/k/v, gate/up grouped; else all 14): as many again in the
    # recomputation, of which the 2 down projections skip, and with the blocks apart (offloaded)
    # the 2 output projections too
    assert len(unused_calls) == (8 if grouped else 28) and sum(unused_calls) == (4 if offload else 2)
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1].keys() == results[0][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-5, atol=1e-7)
    assert not memory.recomputing()


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("equal_lengths", [False, True])
def test_kept_attention_is_not_computed_again_and_keeps_the_gradients(samples, blocks, equal_lengths):
    """Offloaded layers that keep their attention (``memory.Kept``): the recomputation runs no
    attention kernel and the q/k/v group skips its base matmuls, yet the loss and every LoRA
    gradient equal those of the run without checkpointing. Samples of equal length go through
    SDPA's row kernel, unequal ones through one kernel call per sample; the layer recomputed
    whole or as two blocks."""
    from loraforge.models import build_tiny_llama
    from loraforge.train import fused_lora

    if equal_lengths:
        rows = [[_cut(s, 24) for s in samples[:3]], [_cut(s, 24) for s in samples[3:6]]]
    else:
        rows = [samples[:3], samples[3:6]]
    batch = collate_flat(rows)

    group_unused = []
    plain_group = fused_lora.LoraGroupFunction.forward

    def counting_group(ctx, x, bases, scales, value_unused, *adapters):
        group_unused.append(value_unused)
        return plain_group(ctx, x, bases, scales, value_unused, *adapters)

    results, kernel_calls, unused_per_run = [], [], []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "computed again" would be one
        mp.setattr(fused_lora.LoraGroupFunction, "forward", staticmethod(counting_group))
        for keep in (None, False, True):  # None: no checkpointing
            model, _ = build_tiny_llama(seed=6)
            model.set_attn_implementation(attention.register())
            model = _lora(model)
            fused_lora.apply(model)
            assert fused_lora.group(model) == 4
            if keep is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
                plan = memory.MemoryPlan(layers=2, checkpointed=2, offload=True, budget=0, estimate={}, kept_attention=keep)
                memory.apply(model, plan, blocks=blocks)
            group_unused.clear()
            with KernelCalls({"aten::_scaled_dot_product_flash_attention_for_cpu"}) as kernels:
                results.append(_loss_and_grads(model, batch))
            kernel_calls.append(kernels.calls)
            unused_per_run.append((len(group_unused), sum(group_unused)))
    per_pass = 2 * (1 if equal_lengths else 6)  # 2 layers; one call for the whole rows, or one per sample
    assert kernel_calls == [per_pass, 2 * per_pass, per_pass]
    # q/k/v and gate/up groups in forward (and recomputation); kept, the 2 q/k/v ones unused there
    assert unused_per_run == [(4, 0), (8, 0), (8, 2)]
    for result in results[1:]:
        torch.testing.assert_close(result[0], results[0][0])
        assert result[1].keys() == results[0][1].keys()
        for name in results[0][1]:
            torch.testing.assert_close(result[1][name], results[0][1][name], rtol=1e-5, atol=1e-7)
    assert memory.kept() is None


def test_replay_runs_a_kernel_call_that_is_not_the_recorded_one():
    """Replayed outputs go only to the call that made them (same kernel, same shapes): a call
    out of order runs the kernel instead of taking another call's output."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    long, short = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    with attention._Record() as record:
        sdpa(long, long, long, is_causal=True)
        sdpa(short, short, short, is_causal=True)
    assert len(record.outputs) == 2
    with attention._Replay(record.outputs) as replay:
        got = [sdpa(t, t, t, is_causal=True) for t in (short, long)]
    assert replay.missed == 2
    for t, out in zip((short, long), got):
        torch.testing.assert_close(out, sdpa(t, t, t, is_causal=True))
    with attention._Replay(record.outputs) as replay:
        sdpa(long, long, long, is_causal=True)
    assert replay.missed == 0


def _cut(sample, length):
    """``sample`` cut to ``length`` tokens (every sample of a row then as long as the longest)."""
    from loraforge.train.data import TokenizedSample

    assert len(sample.input_ids) >= length
    return TokenizedSample(sample.input_ids[:length], sample.labels[:length])


# ---- whole runs -------------------------------------------------------------------------------

LEVERS_OFF = {"train.attention": "sdpa", "train.fused_loss": False, "train.fused_lora": False, "train.gradient_checkpointing": False}
LEVERS_ON = {"train.attention": "varlen", "train.fused_loss": True, "train.fused_lora": True, "train.memory_budget_gib": 0.0008}


def test_run_with_every_lever_equals_the_plain_run(tiny_model_dir, demo_kept, tmp_path):
    """Same data order, same seed: losses step by step and the final adapter agree; the dry
    run shows the plan (a tiny budget: some layers recomputed)."""
    from loraforge.train.recipe import TrainRun

    dry = TrainRun(train_config(tiny_model_dir, demo_kept, tmp_path / "dry", **LEVERS_ON))
    dry.setup(dry_run=True)
    assert 0 < dry.memory_plan.checkpointed <= 2
    messages = {f.check: f.message for f in dry.findings}
    assert "recompute" in messages["memory_plan"] and "varlen" in messages["device"] and "fused" in messages["device"]

    runs = {}
    for name, levers in (("plain", LEVERS_OFF), ("fast", LEVERS_ON)):
        result = train(train_config(tiny_model_dir, demo_kept, tmp_path / name, **levers, **{"train.max_steps": 3}), show_progress=False)
        steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([s["loss"] for s in steps], [s["tokens"] for s in steps], result.eval_loss, load_file(result.run_dir / "adapter" / "adapter_model.safetensors"))
    plain, fast = runs["plain"], runs["fast"]
    assert fast[1] == plain[1]  # the same real tokens each step (the flat rows carry no padding)
    assert fast[0] == pytest.approx(plain[0], rel=1e-4)
    assert fast[2] == pytest.approx(plain[2], rel=1e-4)
    for key in plain[3]:
        torch.testing.assert_close(fast[3][key], plain[3][key], rtol=1e-3, atol=1e-5)


def test_bench_train_runs_engines_side_by_side_on_cpu(tmp_path):
    """`loraforge bench train` on the embedded default's shape: each engine in its own process,
    results.json with tokens/s and losses; a failing engine (Unsloth: not installed here) is
    reported as failed, not fatal. The numerics check: every engine sees the same rows in the
    same order (equal first losses), and loraforge with every lever forced on follows the
    lever-free reference step by step."""
    from loraforge.bench.train_speed import main

    levers = ["train.fused_lora=true", "train.fused_loss=true", "train.attention=varlen", "train.gradient_checkpointing=true"]
    results = main([
        "--arch", "smollm2", "--engines", "hf-peft,loraforge-plain,loraforge,unsloth", "--cases", "dense", "--quants", "bf16",
        "--steps", "1", "--warmup", "1", "--max-seq-length", "64", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        *[x for kv in levers for x in ("--loraforge-set", kv)],
    ])
    by_engine = {r["engine"]: r for r in results}
    for engine in ("hf-peft", "loraforge-plain", "loraforge"):
        assert by_engine[engine]["tokens_per_s"] > 0 and by_engine[engine]["timed_steps"] == 1, by_engine[engine]
    assert "fused LoRA" in " ".join(by_engine["loraforge"]["accelerations"]) and by_engine["loraforge-plain"]["accelerations"] == []
    assert by_engine["loraforge"]["losses"] == pytest.approx(by_engine["loraforge-plain"]["losses"], rel=1e-5)
    assert by_engine["hf-peft"]["losses"][0] == pytest.approx(by_engine["loraforge"]["losses"][0], rel=1e-5)
    assert "error" in by_engine["unsloth"]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results


def test_profile_names_each_kernel_kind():
    """`bench train --profile` groups GPU kernels by what they are (names as CUDA reports them)."""
    from loraforge.bench.train_speed import kernel_kind

    assert kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>") == "attention"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert kernel_kind("Memcpy DtoH (Device -> Pinned)") == "copy / cast"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>") == "elementwise / reduce"
    assert kernel_kind("_swiglu_backward_kernel") == "triton (liger, loss)"
    assert kernel_kind("something else entirely") == "other"


def test_a_head_with_a_bias_goes_through_the_models_own_logits(samples):
    """A head that is more than a matmul (here a bias) is not bypassed: the loss is the one of
    the model's own logits, with or without the fused loss asked for."""
    from loraforge.models import build_tiny_llama
    from loraforge.train.batch import token_loss_sum
    from loraforge.train.loss import head_is_matmul

    model, _ = build_tiny_llama(seed=9)
    assert head_is_matmul(model)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.normal_()
    assert not head_is_matmul(model)
    batch = collate([samples[:3]], 0)
    with torch.no_grad():
        expected = token_loss_sum(model(input_ids=batch.input_ids, **batch.model_kwargs()).logits, batch.labels)
        for fused in (False, True):
            got = CausalLMLoss(model, fused)(input_ids=batch.input_ids, labels=batch.labels, **batch.model_kwargs())
            torch.testing.assert_close(got, expected)


def test_the_training_forward_builds_no_kv_cache(samples):
    """A training forward keeps no KV cache: with the config's default (use_cache=True)
    transformers would build one, concatenating every layer's K and V into it (a copy of each)."""
    from loraforge.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=3)
    assert model.config.use_cache
    batch = collate([samples[:2]], 0)

    def cats(forward) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            forward()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::cat")

    kwargs = batch.model_kwargs()
    without_cache = cats(lambda: model.model(input_ids=batch.input_ids, use_cache=False, **kwargs))
    assert cats(lambda: model.model(input_ids=batch.input_ids, **kwargs)) == without_cache + 2 * model.config.num_hidden_layers
    for head_is_matmul in (True, False):
        loss_module = CausalLMLoss(model, fused=False)
        loss_module.head_is_matmul = head_is_matmul
        assert cats(lambda: loss_module(input_ids=batch.input_ids, labels=batch.labels, **kwargs)) == without_cache


_INTERPRETED = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own jit functions too
import torch
from loraforge.train import nf4
outputs = []
for packed, state in torch.load(sys.argv[1], weights_only=False):
    assert nf4.covered(packed, state) is None, nf4.covered(packed, state)
    outputs.append(nf4.dequantize(packed, state))
torch.save(outputs, sys.argv[2])
"""
_NF4_CASES = [(torch.float16, True, 64, torch.uint8), (torch.float32, False, 64, torch.uint8), (torch.float32, True, 128, torch.bfloat16), (torch.bfloat16, True, 64, torch.uint8)]


@pytest.fixture(scope="module")
def nf4_interpreted(tmp_path_factory):
    """Each case's weight, its 4-bit form and ``nf4.dequantize``'s output under Triton's
    interpreter: one subprocess for every case (the interpreter must be asked for before
    triton is imported; importing torch and triton takes most of its time)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from loraforge.train import nf4

    torch.manual_seed(0)
    cases = []
    for dtype, nested, blocksize, storage in _NF4_CASES:
        w = torch.randn(41, 3 * nf4.BLOCK_BYTES // 4 + 8, dtype=dtype) * 3  # 497 blocks of 64: 2 of 256 blocks
        cases.append((w, *bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", quant_storage=storage)))
    folder = tmp_path_factory.mktemp("nf4")
    torch.save([(packed, state) for _, packed, state in cases], folder / "in.pt")
    subprocess.run([sys.executable, "-c", _INTERPRETED, str(folder / "in.pt"), str(folder / "out.pt")], check=True, timeout=300)
    return [(*case, got) for case, got in zip(cases, torch.load(folder / "out.pt"))]


@pytest.mark.parametrize("case", range(len(_NF4_CASES)), ids=[f"{d}-nested={n}-block{b}-{s}".replace("torch.", "") for d, n, b, s in _NF4_CASES])
def test_nf4_kernel_equals_the_4bit_format_under_triton_interpreter(nf4_interpreted, case):
    """``nf4.dequantize``'s kernel, run by Triton's interpreter on the CPU, against the format's
    definition (bitsandbytes' absmax dequantization, then ``code[nibble] * absmax`` in fp32):
    every value, the high nibble first, more than one second-level absmax block, the last
    partial program, a shape that is not a multiple of the block, packed bytes in FSDP's bf16
    containers. Exact in fp16 and fp32; bf16 within one step, because the interpreter
    truncates fp32 to bf16 where the GPU rounds (the GPU test checks bitwise against
    bitsandbytes' CUDA path)."""
    import bitsandbytes.functional as bnbf

    w, packed, state, got = nf4_interpreted[case]
    dtype, nested, blocksize, _ = _NF4_CASES[case]
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: w.numel()].long()
    expected = (state.code[codes] * absmax.float().repeat_interleave(blocksize)[: w.numel()]).reshape(w.shape).to(dtype)
    assert got.shape == w.shape and got.dtype == dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, expected)
    assert (got.float() - w.float()).abs().mean() < 0.1 * w.float().abs().mean()  # and it is the weight


def test_nf4_dequantize_leaves_what_the_kernel_does_not_cover_to_bitsandbytes(monkeypatch):
    pytest.importorskip("triton")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from loraforge.train import nf4

    monkeypatch.setattr(nf4, "_interpreted", lambda: True)  # the device is not what is checked here
    w = torch.randn(16, 64)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert nf4.covered(packed, state) == "4-bit type fp4"
    assert torch.equal(nf4.dequantize(packed, state), bnbf.dequantize_4bit(packed, state))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert nf4.covered(packed, state) is None
    assert nf4.covered(packed.reshape(1, -1), state) == "transposed packing"
    assert nf4.covered(packed[: packed.shape[0] // 2], state) == "fewer packed bytes than values / 2"


def test_patches_for_one_model_instance_stay_with_it(monkeypatch):
    """``model.instance_only``: what a kernel library's apply-to-instance puts into the model
    family's transformers module (Liger: the norm and MLP classes, the rotary function) does not
    reach a model built afterwards, and a CPU model keeps working; the instance keeps its own."""
    from transformers.models.llama import modeling_llama

    from loraforge.models import build_tiny_llama
    from loraforge.train.model import instance_only

    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))  # restored after the test
    original_norm, original_rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb

    def gpu_rope(*args, **kwargs):
        raise RuntimeError("a GPU kernel ran on the CPU")

    class GpuNorm(original_norm):
        def forward(self, x):
            raise RuntimeError("a GPU kernel ran on the CPU")

    model, _ = build_tiny_llama(num_layers=1)
    with instance_only(model):
        modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb = GpuNorm, gpu_rope
        model.model.norm.forward = lambda x: x * 0  # the instance's own patch
    assert modeling_llama.LlamaRMSNorm is original_norm
    later, _ = build_tiny_llama(num_layers=1)
    assert type(later.model.norm) is original_norm
    ids = torch.randint(0, 100, (1, 8))
    assert later(input_ids=ids).logits.abs().sum() > 0  # CPU rotary: the original function
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is original_rope
    assert model(input_ids=ids).logits.abs().sum() == 0  # the patched instance's norm zeroes everything
