"""The fast engine against transformers' ``generate`` and PEFT: same greedy tokens, in any batch.

The tiny Llama's weights are re-drawn with a larger spread: at its default init (std 0.02,
tied embeddings) greedy decoding repeats the prompt's last token, which would test nothing.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from loraforge.serve.engine import GenRequest, RequestTooLong
from loraforge.serve.fast import FastEngine, read_peft_adapter, unsupported_reason

PROMPTS = [list(range(5, 16)), [20, 21, 22], [30, 31, 32, 33, 34, 35], list(range(40, 80))]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: OpenMP threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, llama_dir):
    """Three adapters with different ranks, targets, alpha rules; B random (PEFT's init is zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapters")
    configs = {
        "a4": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        "a8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "a16": LoraConfig(r=16, lora_alpha=16, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"gate_proj": 4}),
    }
    paths = {}
    for k, (name, config) in enumerate(configs.items()):
        torch.manual_seed(10 + k)
        config.init_lora_weights = False  # nn.Linear's init for A and B: B is not zero
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), config)
        paths[name] = out / name
        model.save_pretrained(paths[name])
    return paths


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None  # random weights: the full max_new_tokens, EOS or not
    return model, AutoTokenizer.from_pretrained(path)


def engine(llama_dir, adapters=None, device="cpu", dtype=torch.float32, **kw) -> FastEngine:
    model, tokenizer = load(llama_dir)
    kw = {"max_batch_size": 4, "max_queue": 32, "max_seq_len": 256, "prefill_chunk": 8, **kw}
    e = FastEngine(model.to(device, dtype), tokenizer, device, kw.pop("max_batch_size"), kw.pop("max_queue"), **kw)
    e.stop_ids = set()  # random weights: decode the full max_tokens, as generate(min_new_tokens=...)
    for name, path in (adapters or {}).items():
        e.add_adapter(name, path)
    return e


def request(prompt, max_tokens=12, adapter=None, temperature=0.0, top_p=1.0, seed=None, tokenizer=None, loop=None):
    return GenRequest(list(prompt), adapter, max_tokens, temperature, top_p, seed, [], tokenizer, loop or asyncio.new_event_loop())


def reference(model, prompt, max_tokens=12) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def peft_references(llama_dir, adapter_dirs, cases) -> list[list[int]]:
    """``cases``: (prompt, adapter or None); PEFT's generate per adapter, the base with adapters disabled."""
    from peft import PeftModel

    model, _ = load(llama_dir)
    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(model, str(adapter_dirs[names[0]]), adapter_name=names[0]).eval()
    for name in names[1:]:
        peft.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    refs = []
    for prompt, adapter in cases:
        if adapter is None:
            with peft.disable_adapter():
                refs.append(reference(peft, prompt))
        else:
            peft.set_adapter(adapter)
            refs.append(reference(peft, prompt))
    return refs


def test_greedy_tokens_equal_generate(llama_dir):
    e = engine(llama_dir)
    reqs = [request(p, tokenizer=e.tokenizer) for p in PROMPTS]
    e.run_batch(reqs)  # four prompts of 3 to 40 tokens decoded together, prefill in chunks of 8
    model, _ = load(llama_dir)
    assert [r.generated for r in reqs] == [reference(model, p) for p in PROMPTS]
    assert {r.finish_reason for r in reqs} == {"length"}
    assert len(set(map(tuple, (r.generated for r in reqs)))) == len(reqs)  # the answers differ: the test means something


def test_mixed_adapters_in_one_batch_equal_peft(llama_dir, adapter_dirs):
    cases = [(PROMPTS[0], None), (PROMPTS[1], "a4"), (PROMPTS[2], "a8"), (PROMPTS[0], "a16"), (PROMPTS[3], "a4"), (PROMPTS[0], "a8")]
    e = engine(llama_dir, adapter_dirs, max_batch_size=8)
    reqs = [request(p, adapter=a, tokenizer=e.tokenizer) for p, a in cases]
    e.run_batch(reqs)
    expected = peft_references(llama_dir, adapter_dirs, cases)
    assert [r.generated for r in reqs] == expected
    same_prompt = [expected[i] for i in (0, 3, 5)]  # base, a16, a8 on one prompt: the adapters matter
    assert len(set(map(tuple, same_prompt))) == 3


def test_lora_modes_give_the_same_tokens(llama_dir, adapter_dirs):
    cases = [(PROMPTS[0], None), (PROMPTS[1], "a4"), (PROMPTS[2], "a8"), (PROMPTS[0], "a16")]
    results = {}
    for mode in ("fused", "dense", "gather"):
        e = engine(llama_dir, adapter_dirs, lora_mode=mode)
        reqs = [request(p, adapter=a, tokenizer=e.tokenizer) for p, a in cases]
        e.run_batch(reqs)
        results[mode] = [r.generated for r in reqs]
    assert results["fused"] == results["dense"] == results["gather"]


def test_fused_linears_equal_dense_through_add_remove_and_growth(llama_dir, adapter_dirs):
    """The folded shrink (A under the base weight) + masked expand against the dense reference,
    for every layer and group, mixed slots with base rows, while the bank grows and shrinks;
    the HF model keeps its base weights (views, not copies) through the reallocations."""
    import torch.nn.functional as F

    e = engine(llama_dir)
    bank, hf = e.runner.lora, e.model
    assert bank.mode == "fused" and bank.empty
    assert all(w.weight.shape[0] == w.out for layer in bank.weights for w in layer.values())  # no extra columns
    torch.manual_seed(0)

    def check():
        slot = torch.tensor([0, *bank.slots.values(), 0, *bank.slots.values(), 0])
        adapted = 0
        for layer in range(bank.num_layers):
            for group, w in bank.weights[layer].items():
                x = torch.randn(len(slot), w.in_features)
                got, ref = {}, {}
                for mode, into in (("dense", ref), ("fused", got)):
                    bank.set_mode(mode)
                    into["out"] = bank.linear(layer, group, x, bank.step_inputs(slot)).clone()
                torch.testing.assert_close(got["out"], ref["out"], atol=1e-5, rtol=1e-5)
                base = F.linear(x, w.base, w.bias)
                assert torch.equal(got["out"][slot == 0], base[slot == 0])  # base rows: the base alone
                adapted += not torch.allclose(got["out"][slot > 0], base[slot > 0])
        assert adapted >= bank.num_layers  # the adapters change something: the comparison means something
        for layer in bank.weights:
            for w in layer.values():
                assert all(m.weight.untyped_storage().data_ptr() == w.weight.untyped_storage().data_ptr() for m in w.linears)
        qkv = bank.weights[0]["qkv"]
        assert bank.linear(0, "qkv", torch.randn(2, qkv.in_features), None).shape[1] == qkv.out  # without LoRA: the base rows only

    versions = [bank.version]
    e.add_adapter("a8", adapter_dirs["a8"])  # K 1 -> 2, R 0 -> 8
    check()
    e.add_adapter("a4", adapter_dirs["a4"])  # K -> 3
    check()
    e.remove_adapter("a8")
    e.add_adapter("a16", adapter_dirs["a16"])  # slot 1 again; R -> 16: base and A move to new tensors
    assert bank.slots == {"a4": 2, "a16": 1} and (bank.K, bank.R) == (3, 16)
    check()
    versions.append(bank.version)
    e.remove_adapter("a4")
    e.remove_adapter("a16")
    assert bank.step_inputs(torch.tensor([0, 0])) is None and bank.version > versions[-1]  # empty: graphs without LoRA again
    fresh, _ = load(llama_dir)
    ids = torch.tensor([PROMPTS[3]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, fresh(ids).logits)  # the HF model still computes the base model


def test_requests_joining_mid_decode_get_their_own_tokens(llama_dir):
    e = engine(llama_dir)
    first = request(PROMPTS[0], max_tokens=20, tokenizer=e.tokenizer)
    e.waiting.put(first)
    for _ in range(5):
        e.step()
    late = [request(p, tokenizer=e.tokenizer) for p in PROMPTS[1:3]]
    for r in late:
        e.waiting.put(r)
    e.step()
    e.step()  # 3 + 6 prompt tokens: two chunks of 8
    assert len(e.running) == 3 and 5 <= len(first.generated) < 20  # decoding together now
    while any(r.finish_reason is None for r in [first, *late]):
        e.step()
    model, _ = load(llama_dir)
    assert first.generated == reference(model, PROMPTS[0], 20)
    assert [r.generated for r in late] == [reference(model, p) for p in PROMPTS[1:3]]


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(llama_dir):
    e = engine(llama_dir, prefill_chunk=8)
    decoding = request(PROMPTS[1], max_tokens=30, tokenizer=e.tokenizer)
    e.waiting.put(decoding)
    e.step()
    e.step()  # decoding, its first tokens delivered
    long = request(PROMPTS[3], tokenizer=e.tokenizer)  # 40 tokens: 5 chunks of 8
    e.waiting.put(long)
    progress = []
    while not long.generated:
        before = len(decoding.generated)
        e.step()
        progress.append(len(decoding.generated) - before)
    # the decoding request got a token in every step: the 5 chunks, then the step whose
    # delivery brings the long prompt's first token (tokens reach the host one step later)
    assert progress == [1] * 6
    while long.finish_reason is None or decoding.finish_reason is None:
        e.step()
    model, _ = load(llama_dir)
    assert long.generated == reference(model, PROMPTS[3])
    assert decoding.generated == reference(model, PROMPTS[1], 30)


def test_slots_are_reused_after_requests_finish(llama_dir):
    e = engine(llama_dir, max_batch_size=2)
    prompts = [PROMPTS[i % 3] for i in range(5)]
    reqs = [request(p, max_tokens=4 + 3 * i, tokenizer=e.tokenizer) for i, p in enumerate(prompts)]
    e.run_batch(reqs)  # five requests through two slots
    model, _ = load(llama_dir)
    assert [r.generated for r in reqs] == [reference(model, p, 4 + 3 * i) for i, p in enumerate(prompts)]
    assert sorted(e.free_slots) == [0, 1] and not e.running and not bool(e.runner.state.active.any())


def test_seeded_sampling_does_not_depend_on_the_batch(llama_dir):
    e = engine(llama_dir)
    alone = request(PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.8, seed=7, tokenizer=e.tokenizer)
    e.run_batch([alone])
    crowd = [request(PROMPTS[i], max_tokens=16, temperature=1.0, seed=i, tokenizer=e.tokenizer) for i in (1, 2)]
    again = request(PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.8, seed=7, tokenizer=e.tokenizer)
    other = request(PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.8, seed=8, tokenizer=e.tokenizer)
    e.run_batch([*crowd, again, other])
    assert again.generated == alone.generated
    assert other.generated != alone.generated


def test_top_p_near_zero_is_greedy(llama_dir):
    e = engine(llama_dir)
    greedy, nucleus = request(PROMPTS[2], tokenizer=e.tokenizer), request(PROMPTS[2], temperature=1.0, top_p=1e-6, seed=3, tokenizer=e.tokenizer)
    e.run_batch([greedy, nucleus])
    assert nucleus.generated == greedy.generated


def test_cancelled_request_stops_and_frees_its_slot(llama_dir):
    e = engine(llama_dir, max_batch_size=2)
    r = request(PROMPTS[0], max_tokens=50, tokenizer=e.tokenizer)
    e.waiting.put(r)
    for _ in range(4):
        e.step()
    r.cancelled.set()
    e.step()
    assert r.finish_reason == "cancelled" and len(r.generated) < 50
    assert sorted(e.free_slots) == [0, 1] and not e.running


def test_too_long_requests_are_refused_at_submit(llama_dir):
    e = engine(llama_dir, max_seq_len=64)
    with pytest.raises(RequestTooLong, match="max_seq_len 64"):
        e.submit(request(PROMPTS[3], max_tokens=30, tokenizer=e.tokenizer))


def test_unloading_an_adapter_fails_its_requests_only(llama_dir, adapter_dirs):
    e = engine(llama_dir, {"a4": adapter_dirs["a4"]})
    with_adapter, base = request(PROMPTS[0], max_tokens=30, adapter="a4", tokenizer=e.tokenizer), request(PROMPTS[1], max_tokens=30, tokenizer=e.tokenizer)
    e.waiting.put(with_adapter)
    e.waiting.put(base)
    e.step()
    e.remove_adapter("a4")
    while base.finish_reason is None:
        e.step()
    assert with_adapter.finish_reason == "error" and base.finish_reason == "length"
    e.add_adapter("a4", adapter_dirs["a4"])  # its slot is reused
    assert e.runner.lora.slots == {"a4": 1}


def test_adapters_the_fast_engine_cannot_compute_are_refused(tmp_path, llama_dir):
    from peft import LoraConfig, get_peft_model

    from loraforge.errors import AdapterError

    model, _ = load(llama_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterError, match="DoRA.*serve.engine=hf"):
        read_peft_adapter(tmp_path / "dora")


def test_auto_picks_fast_for_llama_and_hf_for_others(llama_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from loraforge.config import load_config
    from loraforge.serve.engine import Engine, create_engine

    model, tokenizer = load(llama_dir)
    cfg = load_config(overrides={"serve.max_seq_len": 128}).serve
    assert isinstance(create_engine(cfg, model, tokenizer, torch.device("cpu")), FastEngine)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)))
    assert "gpt2" in unsupported_reason(gpt2)
    assert type(create_engine(cfg, gpt2, tokenizer, torch.device("cpu"))) is Engine


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_generate():
    from loraforge.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct").eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for text in ("What is the capital of France?", "Write a haiku about mugs.")]
    expected = []
    for p in prompts:
        with torch.no_grad():
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(p) :].tolist()
        expected.append((tokens[: tokens.index(2)] if 2 in tokens else tokens, out.logits))  # up to EOS (<|im_end|>, 2)
    e = FastEngine(model, tokenizer, "cpu", 2, 4, max_seq_len=128, prefill_chunk=32)
    reqs = [request(p, max_tokens=16, tokenizer=tokenizer) for p in prompts]
    e.run_batch(reqs)
    for r, (tokens, logits) in zip(reqs, expected):
        assert_greedy_equal(r.generated, tokens, logits, tie=1e-3)
    assert reqs[0].text == tokenizer.decode(expected[0][0], skip_special_tokens=True) and "Paris" in reqs[0].text


def assert_greedy_equal(ours: list[int], ref: list[int], ref_logits, tie: float) -> None:
    """Equal tokens; a difference is only allowed where the reference's top two logits tie (within ``tie``)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top = ref_logits[i][0].float().topk(2).values
            assert float(top[0] - top[1]) <= tie, f"token {i}: {a} != {b}, reference margin {float(top[0] - top[1]):.4f}"
            return  # after a tie the continuations may differ
    assert len(ours) == len(ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_graphs_equal_eager_and_generate(llama_dir, adapter_dirs):
    cases = [(PROMPTS[0], None), (PROMPTS[1], "a4"), (PROMPTS[2], "a8"), (PROMPTS[3], "a16"), (PROMPTS[0], "a4")]
    results = {}
    for graphs in (True, False):
        e = engine(llama_dir, adapter_dirs, device="cuda", dtype=torch.bfloat16, cuda_graphs=graphs, max_batch_size=8)
        assert (e.graphs is not None) == graphs
        reqs = [request(p, max_tokens=24, adapter=a, tokenizer=e.tokenizer) for p, a in cases]
        e.run_batch(reqs)
        late = request(PROMPTS[1], max_tokens=24, tokenizer=e.tokenizer)  # joins a batch bucket of a different size
        e.run_batch([late, request(PROMPTS[2], max_tokens=24, adapter="a8", tokenizer=e.tokenizer)])
        results[graphs] = [r.generated for r in [*reqs, late]]
        if graphs:
            assert e.graphs.captured >= 2
    assert results[True] == results[False]  # the graphs replay exactly the eager kernels
    model, _ = load(llama_dir)
    model = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[0]], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert_greedy_equal(results[True][0], out.sequences[0, len(PROMPTS[0]) :].tolist(), out.logits, tie=0.1)


@pytest.mark.parametrize("device", [
    "cpu",  # fp32, the torch expand
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),  # bf16, Triton, CUDA graphs
])
def test_fused_lora_gives_dense_logits_and_greedy_tokens(llama_dir, adapter_dirs, device):
    """Fused against dense on one runner, teacher-forced: a prefill chunk mixing the base and
    three adapters, then decode steps (through the CUDA graphs on a GPU), each step run in both
    modes from the same cache and state; then dense's greedy tokens are fed to both. Adapters
    are added after graphs were captured (the bank grows, the base weights move)."""
    from loraforge.serve.fast import kernels

    dtype, tol = (torch.bfloat16, 0.05) if device == "cuda" else (torch.float32, 1e-4)
    e = engine(llama_dir, {"a4": adapter_dirs["a4"]}, device=device, dtype=dtype, max_batch_size=8, prefill_chunk=64)
    runner, bank = e.runner, e.runner.lora
    assert bank.mode == "fused" and bank.triton == (device == "cuda" and kernels.AVAILABLE)
    e.run_batch([request(PROMPTS[1], max_tokens=8, adapter="a4", tokenizer=e.tokenizer), request(PROMPTS[0], max_tokens=8, tokenizer=e.tokenizer)])
    e.add_adapter("a8", adapter_dirs["a8"])
    e.add_adapter("a16", adapter_dirs["a16"])  # K 2 -> 4, R 4 -> 16
    cases = [(PROMPTS[0], None), (PROMPTS[1], "a4"), (PROMPTS[2], "a8"), (PROMPTS[3], "a16"), (PROMPTS[0], "a4"), (PROMPTS[3], "a8")]
    pieces = [(slot, prompt, 0, bank.slot_of(adapter)) for slot, (prompt, adapter) in enumerate(cases)]
    b, rows = 8, torch.arange(len(cases), device=device)

    def both(step):
        out = {}
        for mode in ("dense", "fused"):
            bank.set_mode(mode)
            out[mode] = step().float()
        scale = out["dense"].abs().max()
        torch.testing.assert_close(out["fused"], out["dense"], atol=tol * scale, rtol=0)
        top = out["dense"].topk(2, dim=-1)
        margin = top.values[:, 0] - top.values[:, 1]
        same = out["fused"].argmax(-1) == top.indices[:, 0]
        assert bool((same | (margin <= 2 * tol * scale)).all())  # same greedy token unless dense's top two tie
        return top.indices[:, 0]

    first = both(lambda: runner.prefill(pieces, list(range(len(pieces)))))
    st = runner.state
    st.tokens[rows], st.positions[rows], st.active[rows] = first, torch.tensor([len(p) for p, _ in cases], device=device), True
    st.adapter[rows] = torch.tensor([p[3] for p in pieces], device=device)
    decode = (lambda: e.graphs.decode(b, 64)) if e.graphs is not None else (lambda: runner.decode(b, 64))
    for _ in range(12):
        tokens = both(decode)[: len(cases)]
        runner.commit(b, torch.cat([tokens, torch.zeros(b - len(cases), dtype=tokens.dtype, device=device)]))
    if device == "cuda":
        assert e.graphs.captured >= 1


def test_fast_and_hf_servers_give_the_same_answers(server, adapters, tiny_model_dir, tmp_path):
    """The default (fast) server and one with serve.engine=hf, same model and adapters, greedy."""
    from .conftest import start_server, stop

    hf = start_server(tiny_model_dir, adapters, tmp_path, "--set", "serve.engine=hf", "--set", "serve.max_tokens_limit=64")
    try:
        def answer(s, model):
            body = {"model": model, "messages": [{"role": "user", "content": "Order: two mugs to Lima."}], "max_tokens": 12, "temperature": 0}
            r = s.client().post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        for model in ("alpha", "beta", "base"):
            assert answer(server, model) == answer(hf, model)
        assert "engine: hf" not in (tmp_path / "server.log").read_text()  # chosen, not fallen back to
    finally:
        stop(hf)
