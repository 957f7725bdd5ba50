"""The client's policy against scripted servers behind httpx's transport seam (no network)."""

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from loraforge.client import AsyncLLMClient, BreakerConfig, LLMClient, RetryPolicy, Route
from loraforge.errors import AllRoutesFailed, DeadlineExceeded, RequestRejected, StreamInterrupted

ROUTES = [Route("lora", "http://a", "orders"), Route("base-fallback", "http://b", "base", system_prompt="Answer in JSON.")]


def ok(text="fine", tokens=7):
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"total_tokens": tokens}})


def client(handler, **kw):
    kw.setdefault("registry", CollectorRegistry())
    return AsyncLLMClient(ROUTES, transport=httpx.MockTransport(handler), **kw)


def run(coro):
    return asyncio.run(coro)


def test_primary_answers():
    calls = []

    def handler(request):
        calls.append(request.url.host)
        return ok("hello")

    response = run(client(handler).generate("hi"))
    assert (response.text, response.route, response.attempts, response.tokens_used) == ("hello", "lora", 1, 7)
    assert calls == ["a"] and response.latency_ms >= 0


def test_5xx_falls_back_to_the_next_route_with_its_prompt_shaping():
    seen = {}

    def handler(request):
        seen[request.url.host] = json.loads(request.content)
        return httpx.Response(503) if request.url.host == "a" else ok("from base")

    c = client(handler, retry=RetryPolicy(attempts_per_route=2, base_delay_s=0.001))
    response = run(c.generate("hi"))
    assert response.route == "base-fallback" and response.attempts == 3  # 2 on lora, 1 on base
    assert response.failures == {"lora": "HTTP 503"}
    assert seen["b"]["messages"][0] == {"role": "system", "content": "Answer in JSON."}
    assert seen["b"]["model"] == "base"
    assert c.metrics.fallbacks.labels("lora", "base-fallback", "server_error")._value.get() == 1


def test_a_422_is_not_retried_does_not_trip_and_does_not_fall_back():
    calls = []

    def handler(request):
        calls.append(request.url.host)
        return httpx.Response(422, json={"error": {"message": "max_tokens too large"}})

    c = client(handler, breaker=BreakerConfig(failure_threshold=1))
    with pytest.raises(RequestRejected, match="max_tokens too large") as info:
        run(c.generate("hi"))
    assert info.value.status == 422 and calls == ["a"]
    assert c.breakers["lora"].state.name == "CLOSED"


def test_429_honours_retry_after():
    times = []

    def handler(request):
        times.append(time.monotonic())
        return httpx.Response(429, headers={"Retry-After": "0.3"}) if len(times) == 1 else ok()

    response = run(client(handler).generate("hi"))
    assert response.route == "lora" and response.attempts == 2
    assert times[1] - times[0] >= 0.3


def test_the_deadline_holds_when_every_route_hangs():
    async def handler(request):
        await asyncio.sleep(10)
        return ok()

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        run(client(handler).generate("hi", deadline_s=0.5))
    assert time.monotonic() - started < 1.0


def test_every_route_failing_lists_each_and_why():
    def handler(request):
        if request.url.host == "a":
            raise httpx.ConnectError("refused")
        return httpx.Response(500)

    with pytest.raises(AllRoutesFailed) as info:
        run(client(handler, retry=RetryPolicy(attempts_per_route=1)).generate("hi"))
    assert set(info.value.failures) == {"lora", "base-fallback"}
    assert "ConnectError" in info.value.failures["lora"] and info.value.failures["base-fallback"] == "HTTP 500"


def test_open_breaker_skips_the_route_without_calling_it():
    calls = []

    def handler(request):
        calls.append(request.url.host)
        return httpx.Response(500) if request.url.host == "a" else ok()

    c = client(handler, breaker=BreakerConfig(failure_threshold=2, reset_timeout_s=60), retry=RetryPolicy(attempts_per_route=1))
    for _ in range(2):
        run(c.generate("hi"))
    calls.clear()
    assert run(c.generate("hi")).route == "base-fallback"
    assert calls == ["b"]  # lora not even tried: its circuit is open
    assert c.metrics.circuit.labels("lora")._value.get() == 1


def test_retry_budget_prevents_retry_storms():
    calls = []

    def handler(request):
        calls.append(request.url.host)
        return httpx.Response(503)

    c = client(handler, retry=RetryPolicy(attempts_per_route=5, base_delay_s=0.0001, budget_ratio=0.1, min_retry_tokens=2),
               breaker=BreakerConfig(failure_threshold=10_000, min_calls=10_000))
    for _ in range(20):
        with pytest.raises(AllRoutesFailed):
            run(c.generate("hi"))
    # without a budget: 20 calls x 2 routes x 5 attempts = 200; with it: first tries + ~2 + 0.1 x 20 retries
    assert len(calls) <= 20 * 2 + 2 + 2 + 1


def sse(*pieces, fail_after=None):
    lines = [f'data: {json.dumps({"choices": [{"delta": {"content": p}}]})}\n\n' for p in pieces]
    body = "".join(lines) + ("data: [DONE]\n\n" if fail_after is None else 'data: {"error": {"message": "engine died"}}\n\n')
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def test_stream_falls_back_before_the_first_token_only():
    def handler(request):
        return httpx.Response(502) if request.url.host == "a" else sse("He", "llo")

    async def collect():
        return [x async for x in client(handler).stream("hi")]

    assert run(collect()) == [("base-fallback", "He"), ("base-fallback", "llo")]

    def broken(request):
        return sse("He", fail_after=1)

    async def broken_collect():
        return [x async for x in client(broken).stream("hi")]

    with pytest.raises(StreamInterrupted, match="after part of the answer") as info:
        run(broken_collect())
    assert info.value.partial == "He" and info.value.route == "lora"


def test_sync_client_uses_the_same_core():
    def handler(request):
        if request.url.host == "a":
            return httpx.Response(500)
        return sse("syn", "c") if json.loads(request.content).get("stream") else ok("sync")

    with LLMClient(ROUTES, transport=httpx.MockTransport(handler), registry=CollectorRegistry(), retry=RetryPolicy(attempts_per_route=1)) as c:
        assert c.generate("hi").route == "base-fallback"
        assert list(c.stream("hi")) == [("base-fallback", "syn"), ("base-fallback", "c")]


def test_two_clients_share_one_registry_and_count_into_the_same_families():
    registry = CollectorRegistry()

    def handler(request):
        return ok()

    with LLMClient(ROUTES, transport=httpx.MockTransport(handler), registry=registry) as a, LLMClient(ROUTES, transport=httpx.MockTransport(handler), registry=registry) as b:
        a.generate("hi")
        b.generate("hi")
    assert registry.get_sample_value("llm_client_requests_total", {"route": ROUTES[0].name, "outcome": "success"}) == 2
