"""Worker processes for the gate, driven from the main thread with no helper threads.

``multiprocessing.Pool`` hands tasks and results over in two threads of the main process. On
a machine with as many cores as workers those threads, the main process's own work and the
workers compete for the cores, and the threads for the main process's GIL: measured on the
2-core benchmark machine, a pool of two workers spent ~18% more CPU a record than one process
alone, and a pool of one beside a main process that checks samples too left the worker idle
(the threads waited for the GIL while the main thread computed). Here each worker has a pipe
for tasks and one for results, the main thread writes and reads them itself between its own
work (``pump``), and it never blocks on a write: what does not fit in a pipe waits in an outbox
while the results are read, so a worker blocked on a large result cannot deadlock it.

Messages are an 8-byte little-endian length and a pickle. A worker that fails sends its
traceback instead (length with the top bit set); a worker that dies closes its result pipe.
Both end the run with ``GateError``.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import selectors
import signal
import struct
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from loraforge.errors import GateError

_HEADER = struct.Struct("<Q")
_FAILED = 1 << 63
_PIPE_BYTES = 1 << 20  # Linux pipes hold 64 KiB by default; a task of 256 records is ~200 KiB
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _pipe() -> tuple[int, int]:
    read, write = os.pipe()
    try:
        fcntl.fcntl(write, _F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size works too
        pass
    return read, write


def _read_exactly(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = os.read(fd, min(left, 1 << 22))
        if not part:
            raise EOFError
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _serve(work: Callable[[Any], Any], tasks: int, results: int) -> None:
    """A worker's loop: a task in, ``work(task)`` out, until the task pipe closes."""
    while True:
        try:
            (size,) = _HEADER.unpack(_read_exactly(tasks, _HEADER.size))
            task = pickle.loads(_read_exactly(tasks, size))
        except EOFError:
            return
        try:
            data = pickle.dumps(work(task), protocol=pickle.HIGHEST_PROTOCOL)
            header = _HEADER.pack(len(data))
        except BaseException:  # the main process raises it; the worker stays for close()
            data = traceback.format_exc().encode("utf-8", "replace")
            header = _HEADER.pack(len(data) | _FAILED)
        _write_all(results, header + data)


class Workers:
    """``count`` forked processes running ``work`` on tasks, results per worker in task order."""

    def __init__(self, count: int, work: Callable[[Any], Any]):
        self.pids: list[int] = []
        self.tasks: list[int] = []  # write ends, non-blocking
        self.results: list[int] = []  # read ends, non-blocking
        self.outbox = [bytearray() for _ in range(count)]
        self.inbox = [bytearray() for _ in range(count)]
        self.done: list[deque[bytes]] = [deque() for _ in range(count)]
        self.pending = [0] * count  # tasks given and not yet taken back
        self.selector = selectors.DefaultSelector()
        try:
            for index in range(count):
                self._start(index, work)
        except BaseException:
            self.close()
            raise

    def _start(self, index: int, work) -> None:
        task_read, task_write = _pipe()
        result_read, result_write = _pipe()
        try:
            pid = os.fork()
        except OSError:
            for fd in (task_read, task_write, result_read, result_write):
                os.close(fd)
            raise
        if pid == 0:  # the worker: keep its own two ends, leave with os._exit (no atexit, no flushes)
            code = 0
            try:
                os.close(task_write)
                os.close(result_read)
                for fd in (*self.tasks, *self.results):  # the ends of earlier workers' pipes
                    os.close(fd)
                _serve(work, task_read, result_write)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(task_read)
        os.close(result_write)
        os.set_blocking(task_write, False)
        os.set_blocking(result_read, False)
        self.pids.append(pid)
        self.tasks.append(task_write)
        self.results.append(result_read)
        self.selector.register(result_read, selectors.EVENT_READ, index)

    def submit(self, index: int, task: Any) -> None:
        data = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        self.outbox[index] += _HEADER.pack(len(data))
        self.outbox[index] += data
        self.pending[index] += 1
        self.pump(block=False)

    def ready(self, index: int) -> bool:
        """The oldest pending result of worker ``index`` has arrived (reads what is there first)."""
        if not self.done[index]:
            self.pump(block=False)
        return bool(self.done[index])

    def take(self, index: int) -> Any:
        """The oldest pending result of worker ``index``, waiting for it if needed."""
        while not self.done[index]:
            self.pump(block=True)
        self.pending[index] -= 1
        return pickle.loads(self.done[index].popleft())

    def pump(self, block: bool) -> None:
        """Write what the task pipes take, read what the result pipes hold; with ``block``,
        wait until at least one pipe was ready."""
        for index in range(len(self.tasks)):
            if self.outbox[index]:
                self._write(index)
        writing = [(fd, i) for i, fd in enumerate(self.tasks) if self.outbox[i]]
        for fd, i in writing:
            self.selector.register(fd, selectors.EVENT_WRITE, i)
        try:
            events = self.selector.select(None if block else 0)
        finally:
            for fd, _ in writing:
                self.selector.unregister(fd)
        for key, mask in events:
            if mask & selectors.EVENT_READ:
                self._read(key.data)
            elif self.outbox[key.data]:
                self._write(key.data)

    def _write(self, index: int) -> None:
        box = self.outbox[index]
        try:
            del box[: os.write(self.tasks[index], box)]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            raise GateError(f"gate worker {index} (pid {self.pids[index]}) exited while checking samples") from None

    def _read(self, index: int) -> None:
        box = self.inbox[index]
        while True:
            try:
                part = os.read(self.results[index], 1 << 20)
            except BlockingIOError:
                break
            if not part:
                raise GateError(f"gate worker {index} (pid {self.pids[index]}) exited while checking samples")
            box += part
        while len(box) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(box)
            length = size & ~_FAILED
            if len(box) < _HEADER.size + length:
                break
            data = bytes(box[_HEADER.size : _HEADER.size + length])
            del box[: _HEADER.size + length]
            if size & _FAILED:
                raise GateError(f"gate worker {index} failed:\n{data.decode('utf-8', 'replace')}")
            self.done[index].append(data)

    def close(self, grace_s: float = 10.0) -> None:
        """End the workers (closing their task pipes ends their loops) and reap them; one still
        running after ``grace_s`` seconds is killed."""
        for fd in self.tasks:
            os.close(fd)
        for fd in self.results:
            os.close(fd)
        self.selector.close()
        deadline = time.monotonic() + grace_s
        for pid in self.pids:
            try:
                while os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running: a chunk to finish
                    if time.monotonic() > deadline:  # stuck (in C code, say): do not hang the caller
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        break
                    time.sleep(0.01)
            except ChildProcessError:
                pass
        self.tasks, self.results, self.pids = [], [], []
