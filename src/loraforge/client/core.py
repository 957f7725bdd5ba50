"""The resilient client: ordered routes, a breaker each, one deadline, budgeted retries, real fallback.

Layers, one job each (httpx's model): ``AsyncLLMClient`` applies the policy (deadline, retries,
breakers, fallback, metrics); ``_call_route`` makes one HTTP attempt and classifies its result;
httpx moves the bytes. ``LLMClient`` is a thin synchronous wrapper: it runs the same async core
on a private event loop thread, so the logic exists once.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx

from loraforge.client.breaker import BreakerConfig, CircuitBreaker, State
from loraforge.errors import AllRoutesFailed, DeadlineExceeded, RequestRejected, StreamInterrupted


@dataclass(frozen=True)
class Route:
    """An endpoint plus a model, with optional prompt shaping for that route."""

    name: str
    base_url: str  # the server's root, e.g. http://127.0.0.1:8000 (``/v1`` is added)
    model: str
    api_key: str | None = None
    system_prompt: str | None = None  # makes a base model approximate the adapter's behaviour
    prefix: str | None = None  # prepended to the last user message
    timeout_s: float = 30.0  # one attempt at most this long (within the call's deadline)


@dataclass(frozen=True)
class RetryPolicy:
    attempts_per_route: int = 2
    base_delay_s: float = 0.05
    max_delay_s: float = 1.0
    # Retries may add at most this fraction of calls (plus min_retry_tokens), so a failing
    # service never sees a retry storm.
    budget_ratio: float = 0.2
    min_retry_tokens: float = 5.0


@dataclass
class LLMResponse:
    text: str
    route: str
    latency_ms: float
    tokens_used: int
    attempts: int
    failures: dict[str, str] = field(default_factory=dict)  # routes tried before, and why


class _Failure(Exception):
    """One attempt failed in a way that counts against the route (connection, timeout, 5xx, 429)."""

    def __init__(self, why: str, retry_after: float | None = None):
        super().__init__(why)
        self.why, self.retry_after = why, retry_after


class _RetryBudget:
    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.tokens = policy.min_retry_tokens
        self.lock = threading.Lock()

    def deposit(self) -> None:
        with self.lock:
            self.tokens = min(self.tokens + self.policy.budget_ratio, self.policy.min_retry_tokens + 100)

    def withdraw(self) -> bool:
        with self.lock:
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class _Metrics:
    """The client's metric families in one registry. Families are created once per registry and
    shared by every client on it (labels keep routes apart): an application with two clients on
    the default registry must not fail with prometheus_client's duplicate-timeseries error."""

    _by_registry: dict[int, _Metrics] = {}
    _lock = threading.Lock()

    def __new__(cls, registry=None):
        from prometheus_client import REGISTRY

        registry = registry or REGISTRY
        with cls._lock:
            existing = cls._by_registry.get(id(registry))
            if existing is not None and existing.registry is registry:
                return existing
            metrics = super().__new__(cls)
            metrics._create(registry)
            cls._by_registry[id(registry)] = metrics
            return metrics

    def _create(self, registry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.duration = Histogram("llm_client_request_duration_seconds", "Client call latency per answering route", ["route"], registry=registry)
        self.requests = Counter("llm_client_requests", "Calls per route and outcome", ["route", "outcome"], registry=registry)
        self.fallbacks = Counter("llm_fallback", "Fallbacks from one route to the next", ["from_route", "to_route", "reason"], registry=registry)
        self.circuit = Gauge("llm_circuit_state", "Breaker state: 0 closed, 1 open, 2 half-open", ["route"], registry=registry)


def _request(route: Route, payload: dict) -> dict:
    """URL, JSON body and headers of one chat-completions call on ``route``."""
    headers = {"Authorization": f"Bearer {route.api_key}"} if route.api_key else {}
    return {"url": route.base_url.rstrip("/") + "/v1/chat/completions", "json": {**payload, "model": route.model}, "headers": headers}


def _resume(plan, value=None, error: Exception | None = None) -> tuple:
    """Give the plan the last attempt's outcome; its next action, or ``("done", response)``."""
    try:
        return plan.throw(error) if error is not None else plan.send(value)
    except StopIteration as done:
        return ("done", done.value)


def _messages(route: Route, prompt: str | None, messages: list[dict] | None) -> list[dict]:
    msgs = [dict(m) for m in (messages or [{"role": "user", "content": prompt or ""}])]
    if route.prefix:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] = route.prefix + msgs[last]["content"]
    if route.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": route.system_prompt})
    return msgs


class AsyncLLMClient:
    def __init__(self, routes: list[Route], breaker: BreakerConfig | None = None, retry: RetryPolicy | None = None,
                 deadline_s: float = 30.0, registry=None, transport: httpx.AsyncBaseTransport | None = None, clock=time.monotonic):
        if not routes:
            raise ValueError("give at least one route")
        self.routes = routes
        self.retry = retry or RetryPolicy()
        self.deadline_s = deadline_s
        self.metrics = _Metrics(registry)
        self.breakers = {r.name: CircuitBreaker(r.name, breaker, clock=clock, on_change=self._state_changed) for r in routes}
        for r in routes:
            self.metrics.circuit.labels(r.name).set(0)
        self.budget = _RetryBudget(self.retry)
        self._transport = transport
        self._http: dict[int, httpx.AsyncClient] = {}  # one connection pool per event loop
        self.clock = clock

    @property
    def http(self) -> httpx.AsyncClient:
        """The connection pool of the running event loop (pools cannot cross loops)."""
        key = id(asyncio.get_running_loop())
        client = self._http.get(key)
        if client is None:
            client = self._http[key] = httpx.AsyncClient(transport=self._transport, timeout=None)
        return client

    def _state_changed(self, route: str, state: State) -> None:
        self.metrics.circuit.labels(route).set(int(state))

    async def aclose(self) -> None:
        client = self._http.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    # ---- one attempt ---------------------------------------------------------------------

    async def _call_route(self, route: Route, payload: dict, timeout: float) -> dict:
        try:
            response = await asyncio.wait_for(self.http.post(**_request(route, payload)), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise _Failure(f"timed out after {timeout:.2f} s") from None
        except httpx.HTTPError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None
        return self._classify(route, response)

    @staticmethod
    def _classify(route: Route, response: httpx.Response) -> dict:
        status = response.status_code
        if status == 200:
            return response.json()
        if status == 429 or status >= 500 or status == 408:
            retry_after = response.headers.get("retry-after")
            wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            raise _Failure(f"HTTP {status}", retry_after=wait)
        try:
            body = response.json()
            message = body.get("error", {}).get("message", response.text)
        except (json.JSONDecodeError, AttributeError):
            body, message = response.text, response.text
        raise RequestRejected(f"route {route.name} refused the request: HTTP {status}: {message}", status, route.name, body)

    # ---- the policy ----------------------------------------------------------------------

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, max_tokens: int = 256,
                       temperature: float = 0.0, deadline_s: float | None = None, **params) -> LLMResponse:
        plan = self._plan(prompt, messages, max_tokens, temperature, deadline_s, params)
        action = _resume(plan)
        while action[0] != "done":
            if action[0] == "sleep":
                await asyncio.sleep(action[1])
                action = _resume(plan)
                continue
            try:
                action = _resume(plan, value=await self._call_route(*action[1:]))
            except (_Failure, RequestRejected) as exc:
                action = _resume(plan, error=exc)
        return action[1]

    def _plan(self, prompt, messages, max_tokens, temperature, deadline_s, params):
        """The policy of one call, independent of how HTTP is done: a generator that yields
        ``("call", route, payload, timeout_s)`` and receives the response body (or has the
        attempt's ``_Failure`` / ``RequestRejected`` thrown in), or yields ``("sleep", s)``;
        it returns the ``LLMResponse``. The async and the sync client drive the same plan."""
        started = self.clock()
        deadline = started + (deadline_s if deadline_s is not None else self.deadline_s)
        self.budget.deposit()
        failures: dict[str, str] = {}
        attempts = 0
        for index, route in enumerate(self.routes):
            permit = self._admit(index, route, failures)
            if permit is None:
                continue
            payload = {"messages": _messages(route, prompt, messages), "max_tokens": max_tokens, "temperature": temperature, **params}
            for attempt in range(self.retry.attempts_per_route):
                remaining = deadline - self.clock()
                if remaining <= 0:
                    self.breakers[route.name].release(permit)
                    raise DeadlineExceeded(f"deadline of {deadline - started:.2f} s passed; tried: {failures or 'nothing'}", failures)
                attempts += 1
                t0 = self.clock()
                try:
                    body = yield ("call", route, payload, min(route.timeout_s, remaining))
                except RequestRejected:
                    self.breakers[route.name].release(permit)
                    self.metrics.requests.labels(route.name, "rejected").inc()
                    raise
                except _Failure as failure:
                    self.breakers[route.name].record(permit, ok=False)
                    self.metrics.requests.labels(route.name, "failure").inc()
                    failures[route.name] = failure.why
                    last = attempt == self.retry.attempts_per_route - 1
                    if last or self.breakers[route.name].state is not State.CLOSED or not self.budget.withdraw():
                        break
                    delay = failure.retry_after if failure.retry_after is not None else random.uniform(0, min(self.retry.max_delay_s, self.retry.base_delay_s * 2**attempt))
                    if self.clock() + delay >= deadline:
                        break
                    yield ("sleep", delay)
                    permit = self.breakers[route.name].acquire()
                    if permit is None:
                        break
                    continue
                latency = self.clock() - t0
                self.breakers[route.name].record(permit, ok=True, latency_s=latency)
                self.metrics.requests.labels(route.name, "success").inc()
                self.metrics.duration.labels(route.name).observe(self.clock() - started)
                return LLMResponse(
                    text=body["choices"][0]["message"]["content"], route=route.name, latency_ms=(self.clock() - started) * 1000,
                    tokens_used=(body.get("usage") or {}).get("total_tokens", 0), attempts=attempts, failures=failures,
                )
            self._fallback(index, _reason(failures.get(route.name, "")))
        if self.clock() >= deadline:
            raise DeadlineExceeded(f"deadline of {deadline - started:.2f} s passed; tried: {failures}", failures)
        raise AllRoutesFailed(failures)

    def _admit(self, index: int, route: Route, failures: dict[str, str]):
        """The route's breaker permit, or None (recorded as a circuit_open fallback) when open."""
        permit = self.breakers[route.name].acquire()
        if permit is None:
            failures[route.name] = "circuit open"
            self._fallback(index, "circuit_open")
        return permit

    def _fallback(self, index: int, reason: str) -> None:
        if index + 1 < len(self.routes):
            self.metrics.fallbacks.labels(self.routes[index].name, self.routes[index + 1].name, reason).inc()

    async def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, max_tokens: int = 256,
                     temperature: float = 0.0, deadline_s: float | None = None, **params) -> AsyncIterator[tuple[str, str]]:
        """(route, text piece) as they arrive. Fallback only before the first piece."""
        started = self.clock()
        deadline = started + (deadline_s if deadline_s is not None else self.deadline_s)
        failures: dict[str, str] = {}
        for index, route in enumerate(self.routes):
            permit = self._admit(index, route, failures)
            if permit is None:
                continue
            payload = {"messages": _messages(route, prompt, messages), "max_tokens": max_tokens, "temperature": temperature, "stream": True, **params}
            partial = ""
            try:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                async with asyncio.timeout(remaining):
                    async with self.http.stream("POST", **_request(route, payload)) as response:
                        if response.status_code != 200:
                            await response.aread()
                            self._classify(route, response)
                        async for line in response.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise _Failure(chunk["error"].get("message", "stream error"))
                            piece = (chunk["choices"][0].get("delta") or {}).get("content") if chunk.get("choices") else None
                            if piece:
                                partial += piece
                                yield route.name, piece
                self.breakers[route.name].record(permit, ok=True, latency_s=self.clock() - started)
                self.metrics.requests.labels(route.name, "success").inc()
                return
            except RequestRejected:
                self.breakers[route.name].release(permit)
                raise
            except (_Failure, httpx.HTTPError, TimeoutError) as exc:
                self.breakers[route.name].record(permit, ok=False)
                self.metrics.requests.labels(route.name, "failure").inc()
                why = exc.why if isinstance(exc, _Failure) else f"{type(exc).__name__}: {exc}"
                if partial:
                    raise StreamInterrupted(f"route {route.name} failed after part of the answer: {why}", route.name, partial) from None
                failures[route.name] = why
                self._fallback(index, _reason(why))
        if self.clock() >= deadline:
            raise DeadlineExceeded(f"deadline passed; tried: {failures}", failures)
        raise AllRoutesFailed(failures)


def _reason(why: str) -> str:
    if "circuit" in why:
        return "circuit_open"
    if "timed out" in why or "Timeout" in why:
        return "timeout"
    if why.startswith("HTTP 429"):
        return "rate_limited"
    if why.startswith("HTTP"):
        return "server_error"
    return "connection_error"


class LLMClient:
    """The synchronous client: the same async core, run on an event loop of the calling thread.

    Each calling thread gets its own loop and connection pool; the breakers, the retry budget
    and the metrics are shared by all of them (they are thread-safe). No hop to another
    thread, so the sync path costs what the async one does.
    """

    def __init__(self, routes: list[Route], sync_transport: httpx.BaseTransport | None = None, **kwargs):
        self._client = AsyncLLMClient(routes, **kwargs)
        if sync_transport is None and isinstance(kwargs.get("transport"), httpx.BaseTransport):
            sync_transport = kwargs["transport"]  # e.g. httpx.MockTransport serves both kinds
        self._http = httpx.Client(transport=sync_transport, timeout=None)  # thread-safe, one pool
        self.breakers = self._client.breakers
        self.metrics = self._client.metrics
        self._local = threading.local()
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._lock = threading.Lock()

    def _run(self, coro):
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
            with self._lock:
                self._loops.append(loop)
        return loop.run_until_complete(coro)

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, deadline_s: float | None = None, **params) -> LLMResponse:
        """The same plan as the async client, driven with httpx's sync transport (no event loop)."""
        plan = self._client._plan(prompt, messages, max_tokens, temperature, deadline_s, params)
        action = _resume(plan)
        while action[0] != "done":
            if action[0] == "sleep":
                time.sleep(action[1])
                action = _resume(plan)
                continue
            try:
                action = _resume(plan, value=self._call_route(*action[1:]))
            except (_Failure, RequestRejected) as exc:
                action = _resume(plan, error=exc)
        return action[1]

    def _call_route(self, route: Route, payload: dict, timeout: float) -> dict:
        try:
            response = self._http.post(**_request(route, payload), timeout=timeout)
        except httpx.TimeoutException:
            raise _Failure(f"timed out after {timeout:.2f} s") from None
        except httpx.HTTPError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None
        return self._client._classify(route, response)

    def stream(self, prompt: str | None = None, **kwargs) -> Iterator[tuple[str, str]]:
        agen = self._client.stream(prompt, **kwargs)
        while True:
            try:
                yield self._run(agen.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        self._http.close()
        with self._lock:
            loops, self._loops = self._loops, []
        for loop in loops:
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(self._client.aclose())
                loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
