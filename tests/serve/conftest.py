"""A real `loraforge serve` process on loopback: tiny model, two trained adapters."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraforge.config import load_config
from loraforge.serve.process import ServerProcess

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"


@dataclass
class Server:
    url: str
    process: ServerProcess
    adapter_root: Path

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def start_server(model_dir, adapters: dict, tmp: Path, *extra: str, api_key=API_KEY) -> Server:
    root = tmp / "adapter-root"
    root.mkdir(exist_ok=True)
    process = ServerProcess(
        str(model_dir), adapters, tmp / "server.log", ("--adapter-root", str(root), *extra), ready_timeout=180,
        api_key=api_key, env={"LORAFORGE_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1"},
    )
    process.__enter__()
    return Server(process.url, process, root)


def stop(server: Server) -> None:
    server.process.__exit__()


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
