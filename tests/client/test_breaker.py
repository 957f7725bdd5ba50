import threading

from loraforge.client.breaker import BreakerConfig, CircuitBreaker, State


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fail(b, n=1):
    for _ in range(n):
        b.record(b.acquire(), ok=False)


def test_opens_after_consecutive_failures_and_refuses():
    b = CircuitBreaker("r", BreakerConfig(failure_threshold=3, min_calls=100))
    fail(b, 2)
    assert b.state is State.CLOSED
    fail(b)
    assert b.state is State.OPEN and b.acquire() is None


def test_opens_on_failure_rate_over_the_window():
    b = CircuitBreaker("r", BreakerConfig(failure_threshold=100, failure_rate=0.5, window=10, min_calls=10))
    for i in range(10):
        b.record(b.acquire(), ok=i % 2 == 0)  # alternate: never 2 failures in a row
    assert b.state is State.OPEN


def test_slow_calls_count_as_failures():
    b = CircuitBreaker("r", BreakerConfig(failure_threshold=2, slow_call_s=0.5))
    b.record(b.acquire(), ok=True, latency_s=0.9)
    b.record(b.acquire(), ok=True, latency_s=0.9)
    assert b.state is State.OPEN


def test_half_open_lets_exactly_one_trial_through_under_50_callers():
    clock = Clock()
    b = CircuitBreaker("r", BreakerConfig(failure_threshold=1, reset_timeout_s=10), clock=clock)
    fail(b)
    clock.now = 11
    start = threading.Barrier(50)
    permits = []

    def caller():
        start.wait()
        permits.append(b.acquire())

    threads = [threading.Thread(target=caller) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [p for p in permits if p is not None]
    assert len(granted) == 1 and granted[0].trial and b.state is State.HALF_OPEN


def test_trial_success_closes_and_failure_reopens_with_growing_timeout():
    clock = Clock()
    changes = []
    b = CircuitBreaker("r", BreakerConfig(failure_threshold=1, reset_timeout_s=10, backoff=2), clock=clock, on_change=lambda r, s: changes.append(s))
    fail(b)
    clock.now = 10.5
    b.record(b.acquire(), ok=False)  # the trial fails: open again, for 20 s now
    assert b.state is State.OPEN
    clock.now = 25
    assert b.acquire() is None  # 14.5 s < 20 s
    clock.now = 31
    b.record(b.acquire(), ok=True)
    assert b.state is State.CLOSED
    assert changes == [State.OPEN, State.HALF_OPEN, State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_release_frees_the_trial_without_a_verdict():
    clock = Clock()
    b = CircuitBreaker("r", BreakerConfig(failure_threshold=1, reset_timeout_s=1), clock=clock)
    fail(b)
    clock.now = 2
    permit = b.acquire()
    assert b.acquire() is None
    b.release(permit)  # e.g. the request itself was invalid (422)
    assert b.acquire() is not None and b.state is State.HALF_OPEN
