"""The client against real `loraforge serve` processes on loopback, one of them killed with SIGKILL."""

import time

import pytest
from prometheus_client import CollectorRegistry

from loraforge.client import BreakerConfig, LLMClient, RetryPolicy, Route, State
from loraforge.serve.process import ServerProcess


@pytest.fixture
def two_servers(tmp_path, tiny_model_dir):
    primary = ServerProcess(str(tiny_model_dir), {}, tmp_path / "primary.log", api_key="k1").__enter__()
    fallback = ServerProcess(str(tiny_model_dir), {}, tmp_path / "fallback.log", api_key="k2").__enter__()
    yield primary, fallback, tmp_path
    primary.__exit__()
    fallback.__exit__()


def test_kill_fallback_then_recovery(two_servers, tiny_model_dir):
    primary, fallback, tmp = two_servers
    routes = [Route("lora", primary.url, "base", api_key="k1", timeout_s=5), Route("base-fallback", fallback.url, "base", api_key="k2", timeout_s=5)]
    client = LLMClient(routes, breaker=BreakerConfig(failure_threshold=2, reset_timeout_s=1.0), retry=RetryPolicy(attempts_per_route=1),
                       deadline_s=10, registry=CollectorRegistry())
    try:
        assert client.generate("Order: one mug.", max_tokens=4).route == "lora"
        primary.kill()  # kill -9: connection refused from now on
        started = time.monotonic()
        answers = [client.generate("Order: one mug.", max_tokens=4) for _ in range(3)]
        assert [a.route for a in answers] == ["base-fallback"] * 3
        assert time.monotonic() - started < 10  # within the deadline, every time
        assert client.breakers["lora"].state is State.OPEN  # opened after 2 failures
        assert answers[2].failures == {"lora": "circuit open"}  # the third call did not even try lora
        restarted = ServerProcess(str(tiny_model_dir), {}, tmp / "primary2.log", api_key="k1", port=primary.port).__enter__()
        try:
            time.sleep(1.1)  # the reset timeout: the next call is the half-open trial
            assert client.generate("Order: one mug.", max_tokens=4).route == "lora"
            assert client.breakers["lora"].state is State.CLOSED
        finally:
            restarted.__exit__()
    finally:
        client.close()
