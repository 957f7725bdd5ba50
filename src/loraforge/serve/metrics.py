"""The server's Prometheus metrics, in their own registry (one per app: tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "llm_request_duration_seconds", "Request latency, arrival to last byte", ["model", "endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Arrival to first generated token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llm_time_per_output_token_seconds", "Mean time per generated token after the first", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("llm_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.requests = Counter("llm_requests", "Requests by final status", ["status"], registry=r)
        self.queue_depth = Gauge("llm_queue_depth", "Requests waiting for a batch", registry=r)
        self.queue_capacity = Gauge("llm_queue_capacity", "Max requests that may wait (serve.max_queue); more get 429", registry=r)
        self.batch_size = Histogram("llm_batch_size", "Requests decoded together", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.adapters_loaded = Gauge("llm_adapters_loaded", "LoRA adapters loaded", registry=r)
