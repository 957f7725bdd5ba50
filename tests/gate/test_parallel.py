"""The gate's worker processes: results in order, large messages both ways, failures surface."""

import os

import pytest

from loraforge.errors import GateError
from loraforge.gate.parallel import Workers


def _echo_big(task):
    index, size = task
    return index, b"r" * size


def test_results_come_back_in_order_with_messages_larger_than_a_pipe():
    """Tasks and results of several MiB (more than a pipe holds) in flight at once in both
    directions: the main side never blocks on a write, so nothing deadlocks."""
    workers = Workers(2, _echo_big)
    try:
        sizes = [3 << 20, 10, 5 << 20, 1, 2 << 20, 4 << 20]
        for i, size in enumerate(sizes):
            workers.submit(i % 2, (i, size))
        workers.submit(0, (99, 1 << 20))  # a big task queued behind them
        for i, size in enumerate(sizes):
            assert workers.take(i % 2) == (i, b"r" * size)
        assert workers.take(0) == (99, b"r" * (1 << 20))
        assert workers.pending == [0, 0]
    finally:
        workers.close()


def _fail_on_three(task):
    if task == 3:
        raise ValueError("a broken sample")
    return task * 2


def test_a_failing_task_raises_with_the_workers_traceback():
    workers = Workers(1, _fail_on_three)
    try:
        workers.submit(0, 1)
        workers.submit(0, 3)
        assert workers.take(0) == 2
        with pytest.raises(GateError, match="ValueError: a broken sample"):
            workers.take(0)
    finally:
        workers.close()


def _die(task):
    os._exit(3)


def test_a_worker_that_dies_ends_the_run_with_an_error():
    workers = Workers(1, _die)
    try:
        workers.submit(0, "x")
        with pytest.raises(GateError, match="exited while checking samples"):
            workers.take(0)
    finally:
        workers.close()


def test_close_reaps_every_worker():
    workers = Workers(3, _echo_big)
    pids = list(workers.pids)
    workers.submit(1, (0, 5))  # one still unread at close
    workers.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _hang(task):
    import time

    time.sleep(60)


def test_close_kills_a_worker_stuck_past_the_grace_period():
    import time

    workers = Workers(1, _hang)
    pid = workers.pids[0]
    workers.submit(0, "x")
    started = time.monotonic()
    workers.close(grace_s=0.5)
    assert time.monotonic() - started < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_writing_to_a_dead_worker_raises_a_gate_error():
    workers = Workers(1, _die)
    try:
        workers.submit(0, "x")  # it exits on this one
        os.waitpid(workers.pids[0], 0)
        with pytest.raises(GateError, match="exited while checking samples"):
            for _ in range(100):  # its task pipe is closed: a write fails, or the read sees the end
                workers.submit(0, "y" * (1 << 20))
                workers.ready(0)
    finally:
        workers.close()  # the worker is reaped already: close() takes that
