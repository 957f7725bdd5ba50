"""A real `loraforge serve` process on loopback: tiny model, two trained adapters."""

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraforge.config import load_config

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    adapter_root: Path
    log: Path

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def start_server(model_dir, adapters: dict, tmp: Path, *extra: str, api_key=API_KEY) -> Server:
    port = free_port()
    root = tmp / "adapter-root"
    root.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "loraforge.cli", "serve", "--model", str(model_dir), "--port", str(port), "--adapter-root", str(root), *extra]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "LORAFORGE_API_KEY": api_key or "", "LORAFORGE_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1"}
    if not api_key:
        env.pop("LORAFORGE_API_KEY")
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, root, log)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if server.client().get("/ready").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not ready in time: {log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_model_dir, demo_kept):
    """Two different adapters of the tiny model, trained for real (a few steps each)."""
    from loraforge.train.recipe import train

    out = tmp_path_factory.mktemp("adapters")
    runs = {}
    for name, seed, lr in (("alpha", 1, 5e-3), ("beta", 2, 1e-2)):
        cfg = load_config(overrides={
            "model.name": str(tiny_model_dir), "train.data": str(demo_kept), "train.out": str(out / name),
            "train.max_steps": 3, "train.seed": seed, "train.lr": lr, "train.micro_batch_size": 2, "train.max_seq_length": 512,
        })
        runs[name] = train(cfg, show_progress=False).run_dir
    return runs


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, adapters):
    tmp = tmp_path_factory.mktemp("serve")
    s = start_server(tiny_model_dir, adapters, tmp, "--set", "serve.max_tokens_limit=64", "--set", "serve.max_body_bytes=20000")
    shutil.copytree(adapters["alpha"] / "adapter", s.adapter_root / "alpha-copy")
    yield s
    stop(s)
