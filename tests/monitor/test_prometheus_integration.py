"""A real Prometheus scrapes a real `loraforge serve` and an application using loraforge.client.

Prometheus runs with monitoring/prometheus.yml's jobs and monitoring/alerts.yml, only the
targets and intervals changed (1 s), so the job names, the rules and the metric names are
checked end to end: the server's p99 through histogram_quantile, and the fallback alert
going pending from the client's own counters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from loraforge.serve.metrics import LATENCY_BUCKETS
from loraforge.serve.process import ServerProcess, free_port

from .conftest import MONITORING, prometheus_binary

API_KEY = "monitor-test-key"


class Stack:
    """loraforge serve + Prometheus, started on the first test that needs them (after the binary check)."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp, self.model_dir = tmp, model_dir
        self.server: ServerProcess | None = None
        self.prometheus: subprocess.Popen | None = None
        self.client_port = free_port()  # where the application's start_metrics_server listens
        self.started = False

    def start(self) -> Stack:
        if self.started:
            return self
        if self.prometheus is not None:
            pytest.fail("the stack failed to start in an earlier test", pytrace=False)
        binary = prometheus_binary("prometheus")  # fails (or skips) before anything is started
        self.server = ServerProcess(str(self.model_dir), {}, self.tmp / "server.log", api_key=API_KEY, ready_timeout=180,
                                    env={"PYTHONUNBUFFERED": "1"})  # its port is chosen: Prometheus can start first
        config = self.tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config()))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.tmp / "prometheus.log"
        self.prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        self.server.__enter__()  # waits for /ready
        self.wait_for("Prometheus ready", lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, timeout=30)
        self.started = True
        return self

    def _config(self) -> dict:
        """monitoring/prometheus.yml with this test's targets, 1 s intervals, the real alerts.yml."""
        real = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        targets = {
            "loraforge-serve": self.server.url.removeprefix("http://"),
            "loraforge-client": f"127.0.0.1:{self.client_port}",
            "loraforge-train": f"127.0.0.1:{free_port()}",  # no run: up 0, as between runs
        }
        assert {job["job_name"] for job in real["scrape_configs"]} == targets.keys()
        jobs = []
        for job in real["scrape_configs"]:
            job = {**job, "scrape_interval": "1s", "scrape_timeout": "1s", "static_configs": [{"targets": [targets[job["job_name"]]]}]}
            if job["job_name"] == "loraforge-serve":
                job["authorization"] = {"type": "Bearer", "credentials": API_KEY}  # /metrics needs the key (app.py's guard)
            jobs.append(job)
        return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(MONITORING / real["rule_files"][0])], "scrape_configs": jobs}

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        assert response.status_code == 200, f"{promql}: {response.text}"
        return response.json()["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The value of a query with one result, None with none."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, condition, timeout: float = 20):
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                last = condition()
                if last:
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.25)
        log = self.log.read_text()[-3000:] if self.prometheus else ""
        raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})\nprometheus log:\n{log}")

    def stop(self) -> None:
        if self.prometheus is not None and self.prometheus.poll() is None:
            self.prometheus.terminate()
            try:
                self.prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.prometheus.kill()
        if self.server is not None:
            self.server.__exit__()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    s = Stack(tmp_path_factory.mktemp("monitor"), tiny_model_dir)
    yield s
    s.stop()


def test_prometheus_computes_the_servers_p99(stack):
    s = stack.start()
    client = openai.OpenAI(base_url=s.server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Order: two mugs and a teapot."}]

    def ask() -> float:
        started = time.perf_counter()
        client.chat.completions.create(model="base", messages=messages, max_tokens=8)
        return time.perf_counter() - started

    latencies = [ask()]  # the first request creates the labelled series: scraped at count 1 ...
    s.wait_for("the first request scraped", lambda: s.value("sum(llm_request_duration_seconds_count)") == 1)
    latencies += [ask() for _ in range(20)]  # ... so rate() over the next scrapes sees exactly these 20
    s.wait_for("all 21 requests scraped", lambda: s.value("sum(llm_request_duration_seconds_count)") == 21)

    p99 = s.wait_for("a p99", lambda: s.value("histogram_quantile(0.99, sum(rate(llm_request_duration_seconds_bucket[1m])) by (le))"))
    bound = min(b for b in LATENCY_BUCKETS if b >= max(latencies))  # the server's time is within the client's
    assert math.isfinite(p99) and 0 < p99 <= bound, f"p99 {p99} s; the client measured max {max(latencies):.3f} s (bucket <= {bound})"
    server_total = s.value("sum(llm_request_duration_seconds_sum)")
    assert 0 < server_total <= sum(latencies), f"server {server_total:.3f} s in all vs client {sum(latencies):.3f} s"

    assert s.wait_for("serve up", lambda: s.query('up{job="loraforge-serve"} == 1'))[0]["metric"]["instance"] == s.server.url.removeprefix("http://")
    assert s.value("llm_queue_capacity") == 64  # serve.max_queue's default, set when the engine is built
    assert s.value("sum(llm_generated_tokens_total)") > 0


# ---- an application using loraforge.client ---------------------------------------------------

APPLICATION = textwrap.dedent("""
    import sys, time
    from loraforge.client import LLMClient, Route, start_metrics_server
    dead, live, port = sys.argv[1:4]
    client = LLMClient([Route("primary", dead, "base", timeout_s=2), Route("fallback", live, "base", timeout_s=5)], deadline_s=10)
    start_metrics_server(int(port))
    while True:  # the primary refuses connections: every call falls back
        client.generate("Order: one mug.", max_tokens=2)
        time.sleep(0.2)
""")


class _Upstream(BaseHTTPRequestHandler):
    """A stand-in LLM server for the fallback route (the real one is the p99 test's: no shared traffic)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}], "usage": {"total_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def application(stack, tmp_path):
    s = stack.start()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    dead = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "application.log"
    app = subprocess.Popen([sys.executable, "-c", APPLICATION, dead, f"http://127.0.0.1:{upstream.server_port}", str(s.client_port)],
                           stdout=open(log, "w"), stderr=subprocess.STDOUT)
    yield s, app, log
    app.terminate()
    try:
        app.wait(timeout=10)
    except subprocess.TimeoutExpired:
        app.kill()
    upstream.shutdown()


def test_client_metrics_reach_prometheus_and_the_fallback_alert(application):
    s, app, log = application

    def scraped() -> bool:
        assert app.poll() is None, f"the application exited:\n{log.read_text()[-3000:]}"
        return bool(s.query('up{job="loraforge-client"} == 1'))

    s.wait_for("the application scraped", scraped, timeout=30)
    s.wait_for("fallbacks counted", lambda: s.value('sum(llm_fallback_total{from_route="primary", to_route="fallback"})'))
    assert s.value('sum(llm_client_requests_total{route="fallback", outcome="success"})') > 0
    alert = s.wait_for("LoraforgeFallbackRatioHigh pending or firing", lambda: s.query('ALERTS{alertname="LoraforgeFallbackRatioHigh"}'))
    assert alert[0]["metric"]["instance"] == f"127.0.0.1:{s.client_port}" and alert[0]["metric"]["severity"] == "warning"

    def evaluated() -> list[dict]:
        rules = [r for g in httpx.get(s.url + "/api/v1/rules", timeout=5).json()["data"]["groups"] for r in g["rules"]]
        return rules if all(r["health"] != "unknown" for r in rules) else []

    rules = s.wait_for("every rule evaluated", evaluated)
    assert {r["name"]: r["health"] for r in rules if r["health"] != "ok"} == {}, [r.get("lastError") for r in rules]
    assert len(rules) == len([r for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]])
    assert not s.query('ALERTS{alertname="LoraforgeServerDown"}')  # the server is up
