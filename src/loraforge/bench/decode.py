"""Decode speed on one GPU, in one process: plain ``generate`` vs the fast engine (issue 9).

Measured in one run, on one model, all in-process (no HTTP: the engine alone):

* plain ``model.generate`` (transformers, bf16, sdpa): time per output token at batch 1;
  generated tokens/s for ``streams`` prompts in one batch;
* the fast engine, base model only: TPOT p50 of one stream; tokens/s of ``streams``
  concurrent streams (submitted at once, prompt + answer timed end to end);
* the same with ``adapters`` random LoRA adapters loaded and every request on one of them,
  once per way of applying batched LoRA (``lora_mode``: fused, the default, then dense and
  gather), each with its ratio to the base-only tokens/s;
* TTFT of a ``long_prompt``-token prompt at low load, and while ``streams - 1`` others decode
  (with the longest gap those streams saw between two tokens meanwhile: chunked prefill
  bounds it by one chunk).

Requests decode their full ``new_tokens`` (EOS is ignored; weights are random). On a GPU the
default model is the Llama-3-8B architecture with random bf16 weights (speed does not depend
on their values), built in memory; ``--arch tiny`` is the CPU smoke mode.

Run: ``python -m loraforge.bench.decode --out DIR`` (GPU), ``--arch tiny --streams 8
--prompt-len 32 --new-tokens 16 --long-prompt 64`` (CPU, seconds). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.bench.serve import random_adapters
from loraforge.serve.engine import GenRequest


@dataclass
class TimedRequest(GenRequest):
    """A request that records when each delta came out and wakes a waiter when done."""

    stamps: list[tuple[float, int]] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind, payload) -> None:
        if kind == "delta":
            self.stamps.append((time.perf_counter(), len(self.generated)))
        else:
            self.finished.set()

    def token_times(self) -> list[float]:
        """Seconds per token between consecutive deltas (after the first token; a delta waits
        for whole UTF-8 characters, so it may carry several tokens)."""
        out = []
        for (t0, n0), (t1, n1) in zip(self.stamps, self.stamps[1:]):
            out += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
        return out


class AnyIdTokenizer:
    """The tiny BPE tokenizer decoding ids of any vocabulary (id modulo its size): streaming
    text costs what it costs in serving, whatever the random model's vocabulary."""

    def __init__(self):
        from loraforge.models.tiny import build_tiny_tokenizer

        self.inner = build_tiny_tokenizer()
        self.size = len(self.inner)
        self.eos_token_id = self.pad_token_id = None

    def decode(self, ids, **kw) -> str:
        return self.inner.decode([i % self.size for i in ids], **kw)

    def convert_tokens_to_ids(self, token):
        return None


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 5) if values else None


def build_model(arch: str, device: str):
    """The random-weight model: ``llama3-8b`` (bf16, on the GPU) or ``tiny`` (fp32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if arch == "tiny":
        from loraforge.models.tiny import build_tiny_llama

        model, _ = build_tiny_llama(hidden_size=128, num_layers=4, intermediate_size=256)
        return model.to(device).eval()
    from loraforge.bench.train_smoke import LLAMA3_8B

    config = LlamaConfig(**LLAMA3_8B)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def generate_baseline(model, prompt_len: int, new_tokens: int, streams: int, vocab: int) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.seen_prompt = [], False

        def put(self, value):
            if self.seen_prompt:
                self.stamps.append(time.perf_counter())
            self.seen_prompt = True

        def end(self):
            pass

    device = model.device
    rng = random.Random(1)
    one = torch.tensor([[rng.randrange(vocab) for _ in range(prompt_len)]], device=device)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        streamer = Stamps()
        steps = min(new_tokens, 33)
        model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=steps, min_new_tokens=steps, streamer=streamer, **kw)
        gaps = [b - a for a, b in zip(streamer.stamps, streamer.stamps[1:])]
        batch = torch.tensor([[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(streams)], device=device)
        _sync(device)
        started = time.perf_counter()
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(device)
        seconds = time.perf_counter() - started
    return {"tpot_p50_s_batch1": p50(gaps), f"tokens_per_s_batch{streams}": round(streams * new_tokens / seconds, 1), f"seconds_batch{streams}": round(seconds, 2)}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Driver:
    """Submits requests to a started engine and waits for them (the engine runs in its thread)."""

    def __init__(self, engine, tokenizer, vocab: int, seed: int = 0):
        self.engine, self.tokenizer, self.vocab = engine, tokenizer, vocab
        self.rng = random.Random(seed)

    def request(self, prompt_len: int, new_tokens: int, adapter: str | None = None) -> TimedRequest:
        prompt = [self.rng.randrange(self.vocab) for _ in range(prompt_len)]
        return TimedRequest(prompt, adapter, new_tokens, 0.0, 1.0, None, [], self.tokenizer, None)

    def run(self, requests: list[TimedRequest]) -> float:
        started = time.perf_counter()
        for r in requests:
            r.created = time.perf_counter()
            self.engine.submit(r)
        for r in requests:
            r.finished.wait()
        return time.perf_counter() - started

    def streams(self, n: int, prompt_len: int, new_tokens: int, adapters: list[str | None]) -> dict:
        reqs = [self.request(prompt_len, new_tokens, adapters[i % len(adapters)]) for i in range(n)]
        seconds = self.run(reqs)
        tokens = sum(len(r.generated) for r in reqs)
        tpot = p50([t for r in reqs for t in r.token_times()])
        return {"streams": n, "tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3),
                "ttft_p50_s": p50([r.first_token_at - r.created for r in reqs]), "tpot_p50_s": tpot,
                "decode_tokens_per_s": round(n / tpot, 1) if tpot else None}  # steady state: all n decoding

    def single(self, prompt_len: int, new_tokens: int, repeats: int, adapter: str | None = None) -> dict:
        reqs = [self.request(prompt_len, new_tokens, adapter) for _ in range(repeats)]
        for r in reqs:
            self.run([r])
        return {"ttft_p50_s": p50([r.first_token_at - r.created for r in reqs]), "tpot_p50_s": p50([t for r in reqs for t in r.token_times()])}

    def ttft_under_load(self, others: int, prompt_len: int, long_prompt: int, repeats: int) -> dict:
        """TTFT of long prompts while ``others`` streams decode; the longest gap those saw meanwhile."""
        background = [self.request(prompt_len, self.engine.max_len - prompt_len) for _ in range(others)]
        for r in background:
            self.engine.submit(r)
        while any(r.first_token_at is None for r in background):
            time.sleep(0.005)
        time.sleep(0.05)
        window = time.perf_counter()
        probes = [self.request(long_prompt, 4) for _ in range(repeats)]
        for r in probes:
            self.run([r])
        window_end = time.perf_counter()
        gaps = []
        for r in background:
            inside = [(t, n) for t, n in r.stamps if window <= t <= window_end]
            gaps += [(t1 - t0) / (n1 - n0) for (t0, n0), (t1, n1) in zip(inside, inside[1:])]
        tokens = sum(1 for r in background for t, _ in r.stamps if window <= t <= window_end)
        for r in background:
            r.cancelled.set()  # a cancelled request ends without a "done" event: wait for the engine
        while any(r.finish_reason is None for r in background):
            time.sleep(0.01)
        return {"others": others, "long_prompt": long_prompt, "ttft_p50_s": p50([r.first_token_at - r.created for r in probes]),
                "ttft_max_s": round(max(r.first_token_at - r.created for r in probes), 5),
                "others_max_gap_s": round(max(gaps), 5) if gaps else None, "others_tpot_p50_s": p50(gaps),
                "others_tokens_per_s": round(tokens / (window_end - window), 1)}


def bench_decode(arch: str, out: Path, streams: int, prompt_len: int, new_tokens: int, long_prompt: int, adapters: int, rank: int,
                 prefill_chunk: int, skip_generate: bool = False) -> dict:
    from loraforge.serve.fast import FastEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = build_model(arch, device)
    vocab = model.config.vocab_size
    tokenizer = AnyIdTokenizer()
    result = {"arch": arch, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "streams": streams, "prompt_len": prompt_len, "new_tokens": new_tokens, "prefill_chunk": prefill_chunk}
    with tempfile.TemporaryDirectory() as tmp:
        paths = random_adapters(model, Path(tmp), adapters, rank)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"built": result["build_s"]}), flush=True)
        if not skip_generate:
            result["generate"] = generate_baseline(model, prompt_len, new_tokens, streams, vocab)
            print(json.dumps({"generate": result["generate"]}), flush=True)
        max_len = max(prompt_len + new_tokens, long_prompt + 4, 2 * prompt_len + new_tokens) + 16
        engine = FastEngine(model, tokenizer, device, streams, 4 * streams, max_seq_len=max_len, prefill_chunk=prefill_chunk)
        engine.stop_ids = set()
        engine.start()
        drive = Driver(engine, tokenizer, vocab)
        fast: dict = {"kv_cache_gib": round(engine.runner.kv_cache_bytes / 2**30, 2)}
        drive.streams(streams, prompt_len, new_tokens, [None])  # warm-up: captures the graphs this load uses
        fast["single_stream"] = drive.single(prompt_len, new_tokens, 3)
        fast["base_streams"] = drive.streams(streams, prompt_len, new_tokens, [None])
        print(json.dumps({"fast": fast}), flush=True)
        if engine.graphs is not None:
            graphs, engine.graphs = engine.graphs, None
            fast["single_stream_no_cuda_graphs"] = drive.single(prompt_len, min(new_tokens, 32), 1)
            engine.graphs = graphs
        fast["ttft_long_prompt_idle"] = drive.single(long_prompt, 4, 5)
        drive.ttft_under_load(streams - 1, prompt_len, long_prompt, 2)  # warm-up (graphs of these buckets)
        fast["ttft_long_prompt_under_load"] = drive.ttft_under_load(streams - 1, prompt_len, long_prompt, 5)
        print(json.dumps({"fast": fast}), flush=True)
        for name, path in paths.items():
            engine.add_adapter(name, path)
        names = list(paths)
        default_mode = engine.runner.lora.mode
        fast["lora_expand"] = "triton" if engine.runner.lora.triton else "torch"  # fused mode's expand kernel
        for mode in ("fused", "dense", "gather"):
            with engine.lock:
                engine.runner.lora.set_mode(mode)
            drive.streams(streams, prompt_len, new_tokens, names)  # warm-up (graphs)
            run = drive.streams(streams, prompt_len, new_tokens, names)
            run["ratio_to_base"] = round(run["tokens_per_s"] / fast["base_streams"]["tokens_per_s"], 3)
            fast[f"adapter_streams_{mode}"] = run
            print(json.dumps({mode: run}), flush=True)
        with engine.lock:
            engine.runner.lora.set_mode(default_mode)
        drive.streams(streams, prompt_len, new_tokens, [None, *names])  # warm-up (graphs again after the mode switch)
        fast["single_stream_adapter"] = drive.single(prompt_len, new_tokens, 2, names[0])
        fast["mixed_streams_base_and_adapters"] = drive.streams(streams, prompt_len, new_tokens, [None, *names])
        fast["cuda_graphs_captured"] = engine.graphs.captured if engine.graphs is not None else 0
        engine.shutdown()
    result["fast"] = fast
    if device == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama3-8b", choices=["llama3-8b", "tiny"])
    parser.add_argument("--out", type=Path, default=Path("bench-out/decode"))
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--skip-generate", action="store_true", help="leave out the plain generate baseline")
    args = parser.parse_args()
    result = bench_decode(args.arch, args.out, args.streams, args.prompt_len, args.new_tokens, args.long_prompt, args.adapters, args.rank,
                          args.prefill_chunk, args.skip_generate)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
