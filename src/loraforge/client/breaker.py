"""A circuit breaker per route: closed -> open -> half-open -> closed.

* closed: calls pass; it opens after ``failure_threshold`` consecutive failures, or when the
  failure rate over the last ``window`` calls reaches ``failure_rate`` (once ``min_calls``
  calls are in the window). A call slower than ``slow_call_s`` counts as a failure.
* open: calls are refused (the client goes to the next route) until ``reset_timeout_s`` has
  passed; then the next caller becomes the one trial call of half-open.
* half-open: exactly one trial call at a time; the others are refused. ``success_threshold``
  successful trials close it; a failed trial re-opens it with the reset timeout multiplied by
  ``backoff`` (up to ``max_reset_timeout_s``).

Thread- and asyncio-safe without serializing calls: the lock guards only the state change,
never the call itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

log = logging.getLogger("loraforge.client")


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    slow_call_s: float | None = None
    reset_timeout_s: float = 10.0
    backoff: float = 2.0
    max_reset_timeout_s: float = 300.0
    success_threshold: int = 1


@dataclass(frozen=True)
class Permit:
    trial: bool  # the half-open trial call


class CircuitBreaker:
    def __init__(self, route: str, config: BreakerConfig | None = None, clock=time.monotonic, on_change=None):
        self.route = route
        self.cfg = config or BreakerConfig()
        self.clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self.state = State.CLOSED
        self._consecutive = 0
        self._outcomes: deque[bool] = deque(maxlen=self.cfg.window)  # True = failure
        self._opened_at = 0.0
        self._reset_timeout = self.cfg.reset_timeout_s
        self._trial_in_flight = False
        self._trial_successes = 0

    def acquire(self) -> Permit | None:
        """A permit to call, or None when the route must be skipped now."""
        with self._lock:
            if self.state is State.CLOSED:
                return Permit(trial=False)
            if self.state is State.OPEN:
                if self.clock() - self._opened_at < self._reset_timeout:
                    return None
                self._set(State.HALF_OPEN)
            if self._trial_in_flight:
                return None
            self._trial_in_flight = True
            return Permit(trial=True)

    def record(self, permit: Permit, ok: bool, latency_s: float | None = None) -> None:
        if ok and self.cfg.slow_call_s is not None and latency_s is not None and latency_s > self.cfg.slow_call_s:
            ok = False
        with self._lock:
            if permit.trial:
                self._trial_in_flight = False
                if self.state is not State.HALF_OPEN:
                    return
                if ok:
                    self._trial_successes += 1
                    if self._trial_successes >= self.cfg.success_threshold:
                        self._close()
                else:
                    self._reset_timeout = min(self._reset_timeout * self.cfg.backoff, self.cfg.max_reset_timeout_s)
                    self._open()
                return
            if self.state is not State.CLOSED:
                return
            self._outcomes.append(not ok)
            self._consecutive = 0 if ok else self._consecutive + 1
            failures = sum(self._outcomes)
            rate_tripped = len(self._outcomes) >= self.cfg.min_calls and failures / len(self._outcomes) >= self.cfg.failure_rate
            if self._consecutive >= self.cfg.failure_threshold or rate_tripped:
                self._open()

    def release(self, permit: Permit) -> None:
        """The call ended without a verdict on the route (the request itself was wrong)."""
        if permit.trial:
            with self._lock:
                self._trial_in_flight = False

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._trial_successes = 0
        self._set(State.OPEN)

    def _close(self) -> None:
        self._outcomes.clear()
        self._consecutive = 0
        self._reset_timeout = self.cfg.reset_timeout_s
        self._set(State.CLOSED)

    def _set(self, state: State) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        log.info("circuit %s: %s -> %s", self.route, previous.name.lower(), state.name.lower(),
                 extra={"route": self.route, "from_state": previous.name.lower(), "to_state": state.name.lower(), "reset_timeout_s": self._reset_timeout})
        if self.on_change:
            self.on_change(self.route, state)
