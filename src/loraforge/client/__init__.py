"""The resilient client applications use to call LLM servers (loraforge serve, vLLM, hosted APIs).

    from loraforge.client import LLMClient, Route
    client = LLMClient([Route("lora", "http://a:8000", "orders"), Route("base-fallback", "http://b:8000", "base",
                        system_prompt="Answer with the JSON only.")])
    answer = client.generate("Extract the order ...")   # .text, .route, .latency_ms, .tokens_used, .attempts
    start_metrics_server(9102)   # its Prometheus metrics on http://127.0.0.1:9102/metrics
"""

from loraforge.client.breaker import BreakerConfig, CircuitBreaker, State
from loraforge.client.core import AsyncLLMClient, LLMClient, LLMResponse, RetryPolicy, Route
from loraforge.client.metrics import start_metrics_server

__all__ = ["AsyncLLMClient", "BreakerConfig", "CircuitBreaker", "LLMClient", "LLMResponse", "RetryPolicy", "Route", "State", "start_metrics_server"]
