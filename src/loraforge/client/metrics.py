"""Expose the client's Prometheus metrics from an application process.

Clients built without ``registry=`` count into prometheus_client's default registry
(``llm_client_requests_total``, ``llm_client_request_duration_seconds``, ``llm_fallback_total``,
``llm_circuit_state``); an application that has no HTTP server of its own serves them with:

    from loraforge.client import start_metrics_server
    start_metrics_server(9102)   # http://127.0.0.1:9102/metrics, job loraforge-client in monitoring/prometheus.yml
"""

from __future__ import annotations


def start_metrics_server(port: int, addr: str = "127.0.0.1"):
    """Serve the default registry on ``http://ADDR:PORT/metrics`` from a daemon thread.

    Loopback by default, as ``loraforge serve`` is: pass ``addr="0.0.0.0"`` for a Prometheus on
    another host. Returns prometheus_client's ``(server, thread)``; ``server.shutdown()`` stops it.
    A client given its own ``registry=`` is not served here: pass that registry to
    ``prometheus_client.start_http_server`` instead.
    """
    from prometheus_client import REGISTRY, start_http_server

    return start_http_server(port, addr=addr, registry=REGISTRY)
