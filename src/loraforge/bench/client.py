"""``loraforge bench client``: the resilient client's own overhead per call vs raw httpx.

Both call the same local server, which answers a fixed chat completion at once, so the
difference is the client's policy (breaker, deadline, budget, metrics) plus its sync
wrapper's hop to its event loop. Reported: p50 and p99 of each, and of the difference.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}], "usage": {"total_tokens": 3}}).encode()
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


class _Instant(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        # one write for head and body: two small writes meet delayed ACKs and cost ~40 ms
        self.wfile.write(RESPONSE)

    def log_message(self, *args):
        pass


def _percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"p50_ms": round(statistics.median(samples) * 1000, 4), "p99_ms": round(samples[int(0.99 * (len(samples) - 1))] * 1000, 4)}


def bench_client(calls: int = 2000) -> dict:
    import httpx
    from prometheus_client import CollectorRegistry

    from loraforge.client import LLMClient, Route

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Instant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.0}
    raw, ours = [], []
    try:
        with httpx.Client() as http, LLMClient([Route("r", url, "m")], registry=CollectorRegistry()) as client:
            for _ in range(200):  # warm-up both
                http.post(url + "/v1/chat/completions", json=payload)
                client.generate("hi", max_tokens=8)
            for _ in range(calls):  # interleaved, so drift hits both alike
                t0 = time.perf_counter()
                http.post(url + "/v1/chat/completions", json=payload).json()
                t1 = time.perf_counter()
                client.generate("hi", max_tokens=8)
                t2 = time.perf_counter()
                raw.append(t1 - t0)
                ours.append(t2 - t1)
        async_raw, async_ours = _bench_async(url, payload, calls)
    finally:
        server.shutdown()
    return {
        "calls": calls,
        "sync": _compare(raw, ours),
        "async": _compare(async_raw, async_ours),
    }


def _compare(raw: list[float], ours: list[float]) -> dict:
    return {
        "raw_httpx": _percentiles(raw), "loraforge_client": _percentiles(ours),
        "overhead_p50_ms": round((statistics.median(ours) - statistics.median(raw)) * 1000, 4),
        "overhead_p99_ms": round((sorted(ours)[int(0.99 * (len(ours) - 1))] - sorted(raw)[int(0.99 * (len(raw) - 1))]) * 1000, 4),
    }


def _bench_async(url: str, payload: dict, calls: int) -> tuple[list[float], list[float]]:
    import asyncio

    import httpx
    from prometheus_client import CollectorRegistry

    from loraforge.client import AsyncLLMClient, Route

    async def run():
        raw, ours = [], []
        async with httpx.AsyncClient() as http:
            client = AsyncLLMClient([Route("r", url, "m")], registry=CollectorRegistry())
            for _ in range(200):
                await http.post(url + "/v1/chat/completions", json=payload)
                await client.generate("hi", max_tokens=8)
            for _ in range(calls):
                t0 = time.perf_counter()
                (await http.post(url + "/v1/chat/completions", json=payload)).json()
                t1 = time.perf_counter()
                await client.generate("hi", max_tokens=8)
                t2 = time.perf_counter()
                raw.append(t1 - t0)
                ours.append(t2 - t1)
            await client.aclose()
        return raw, ours

    return asyncio.run(run())
