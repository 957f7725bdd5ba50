"""`loraforge serve` as a child process on loopback: for the demo, the benchmarks and tests."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loraforge.errors import ServeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start on enter (waits for /ready), stop on exit.

    ``api_key``: a fresh random key by default, a given one, or None for no authentication.
    """

    def __init__(
        self, model: str, adapters: dict[str, Path], log: Path, extra: tuple[str, ...] = (), ready_timeout: float = 300,
        api_key: str | None = "random", env: dict[str, str] | None = None, port: int | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = secrets.token_urlsafe(16) if api_key == "random" else api_key
        self.env = env or {}
        self.args = [sys.executable, "-m", "loraforge.cli", "serve", "--model", model, "--port", str(self.port), *extra]
        for name, path in adapters.items():
            self.args += ["--adapter", f"{name}={path}"]
        self.log = Path(log)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, **self.env}
        env.pop("LORAFORGE_API_KEY", None)
        if self.api_key:
            env["LORAFORGE_API_KEY"] = self.api_key
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.ready_timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(f"the server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/ready", headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise ServeError(f"the server was not ready within {self.ready_timeout:g} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown handlers run."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
