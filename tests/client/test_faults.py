"""Faults shaped by our proxy in front of one real `loraforge serve`: hangs, 5xx, drops, slowness."""

import time

import pytest
from prometheus_client import CollectorRegistry

from loraforge.client import BreakerConfig, LLMClient, RetryPolicy, Route, State
from loraforge.errors import DeadlineExceeded
from loraforge.serve.process import ServerProcess

from .proxy import FaultProxy


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, tiny_model_dir):
    with ServerProcess(str(tiny_model_dir), {}, tmp_path_factory.mktemp("faults") / "server.log", api_key=None) as server:
        yield server


def make_client(primary: FaultProxy, fallback: FaultProxy, **kw) -> LLMClient:
    routes = [Route("lora", primary.url, "base", timeout_s=kw.pop("timeout_s", 5)), Route("base-fallback", fallback.url, "base", timeout_s=5)]
    return LLMClient(routes, registry=CollectorRegistry(), retry=RetryPolicy(attempts_per_route=2, base_delay_s=0.01), **kw)


def test_deadline_holds_when_every_route_hangs(real_server):
    a, b = FaultProxy(real_server.port, "hang"), FaultProxy(real_server.port, "hang")
    with make_client(a, b, deadline_s=1.5) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.generate("hi", max_tokens=4)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("fault", ["error", "drop"])
def test_faults_fall_back_and_open_the_breaker(real_server, fault):
    a, b = FaultProxy(real_server.port, fault), FaultProxy(real_server.port, "pass")
    with make_client(a, b, breaker=BreakerConfig(failure_threshold=3, reset_timeout_s=0.5)) as client:
        answers = [client.generate("hi", max_tokens=4) for _ in range(3)]
        assert {x.route for x in answers} == {"base-fallback"}
        assert client.breakers["lora"].state is State.OPEN
        a.mode = "pass"  # the primary heals
        time.sleep(0.6)
        assert client.generate("hi", max_tokens=4).route == "lora"
        assert client.breakers["lora"].state is State.CLOSED


def test_slow_calls_count_as_failures(real_server):
    a, b = FaultProxy(real_server.port, "latency", latency_s=0.4), FaultProxy(real_server.port, "pass")
    with make_client(a, b, breaker=BreakerConfig(failure_threshold=2, slow_call_s=0.2, reset_timeout_s=60)) as client:
        for _ in range(2):
            assert client.generate("hi", max_tokens=2).route == "lora"  # slow, but it answered
        assert client.breakers["lora"].state is State.OPEN
        assert client.generate("hi", max_tokens=2).route == "base-fallback"
