"""``loraforge bench serve``: the server under concurrent load vs one ``model.generate`` at a time.

The load generator sends ``requests`` chat requests (mixed over the base model and the
adapters, prompt and output lengths drawn from fixed distributions, seeded) with
``concurrency`` in flight, streaming each answer to time the first token and every later one.
The baseline, in the same run and on the same model, answers the same requests one by one
with ``model.generate`` (the adapter switched per request with PEFT's ``set_adapter``).
Reported: generated tokens/s, time to first token p50/p99, time per output token p50/p99.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = "order mug lamp city deliver parcel customer quantity price weekend express address note please thanks".split()


def make_requests(n: int, models: list[str], seed: int = 0, max_tokens: tuple[int, int] = (16, 64)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120)))
        out.append({"model": models[i % len(models)], "prompt": f"Summarize this order note: {prompt}", "max_tokens": rng.randint(*max_tokens)})
    return out


def make_random_adapters(model_dir: Path, out: Path, count: int, r: int = 16) -> dict[str, Path]:
    """``count`` LoRA adapters with random (non-zero) weights: serving cost does not depend on their values."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return random_adapters(base, out, count, r, tokenizer=AutoTokenizer.from_pretrained(model_dir))


def random_adapters(base, out: Path, count: int, r: int = 16, tokenizer=None) -> dict[str, Path]:
    """Save ``count`` all-linear adapters of rank ``r`` with random A and B for the in-memory ``base``
    (left unchanged), in PEFT format, each with ``tokenizer`` when given."""
    import torch
    from peft import LoraConfig, get_peft_model

    paths = {}
    for k in range(count):
        torch.manual_seed(k)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
        paths[f"adapter{k}"] = out / f"adapter{k}"
        model.save_pretrained(paths[f"adapter{k}"])
        if tokenizer is not None:
            tokenizer.save_pretrained(paths[f"adapter{k}"])
        base = model.unload()
    return paths


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _summary(ttfts, tpots, tokens, seconds) -> dict:
    return {
        "generated_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
        "tpot_p50_s": _percentile(tpots, 0.5), "tpot_p99_s": _percentile(tpots, 0.99),
    }


def load_server(url: str, api_key: str, requests: list[dict], concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)

    def one(req):
        start = time.perf_counter()
        stamps = []
        stream = client.chat.completions.create(
            model=req["model"], messages=[{"role": "user", "content": req["prompt"]}], max_tokens=req["max_tokens"],
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
        tokens = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        ttft = stamps[0] - start if stamps else None
        tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        return ttft, tpot, tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    seconds = time.perf_counter() - started
    return _summary([r[0] for r in results if r[0] is not None], [r[1] for r in results if r[1] is not None], sum(r[2] for r in results), seconds)


def baseline_generate(model_name: str, adapters: dict[str, Path], requests: list[dict]) -> dict:
    """One ``model.generate`` at a time (greedy); a streamer timestamps every generated token."""
    import contextlib

    import torch
    from peft import PeftModel
    from transformers.generation.streamers import BaseStreamer

    from loraforge.models import load_causal_lm, load_tokenizer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.prompt_seen = [], False

        def put(self, value):
            if self.prompt_seen:
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True  # generate() first passes the prompt

        def end(self):
            pass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    for i, (name, path) in enumerate(adapters.items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name).eval()
        else:
            model.load_adapter(str(path), adapter_name=name)
    ttfts, tpots, tokens = [], [], 0
    started = time.perf_counter()
    for req in requests:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": req["prompt"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(device)
        if adapters and req["model"] != "base":
            model.set_adapter(req["model"])
        context = model.disable_adapter() if adapters and req["model"] == "base" else contextlib.nullcontext()
        streamer = Stamps()
        t0 = time.perf_counter()
        with torch.no_grad(), context:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_tokens"], do_sample=False, streamer=streamer)
        stamps = streamer.stamps
        tokens += len(stamps)
        if stamps:
            ttfts.append(stamps[0] - t0)
        if len(stamps) > 1:
            tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return _summary(ttfts, tpots, tokens, time.perf_counter() - started)


def bench_serve(model: str, adapters: dict[str, Path], out_dir: Path, requests: int, concurrency: int, max_tokens: tuple[int, int] = (16, 64)) -> dict:
    from loraforge.serve.process import ServerProcess

    out_dir.mkdir(parents=True, exist_ok=True)
    reqs = make_requests(requests, ["base", *adapters], max_tokens=max_tokens)
    extra = ("--set", f"serve.max_batch_size={concurrency}", "--set", "serve.max_tokens_limit=4096")
    with ServerProcess(model, adapters, out_dir / "serve.log", extra) as server:
        load_server(server.url, server.api_key, reqs[:2], 2)  # warm-up
        served = load_server(server.url, server.api_key, reqs, concurrency)
    baseline = baseline_generate(model, adapters, reqs)
    result = {
        "model": model, "adapters": sorted(adapters), "requests": requests, "concurrency": concurrency,
        "server": served, "baseline_one_generate_at_a_time": baseline,
        "throughput_ratio": round(served["tokens_per_s"] / baseline["tokens_per_s"], 2),
    }
    (out_dir / "bench_serve.json").write_text(json.dumps(result, indent=2))
    return result
