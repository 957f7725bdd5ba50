"""The run report: built from a real gate + training (+ eval) run on the tiny model, rendered
in headless Chromium, which must decode every image and raise no script error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from loraforge.report import collect, eval_table, write_report
from tests.train.conftest import train_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("LORAFORGE_SKIP_BROWSER") == "1":
            pytest.skip("no Chromium and LORAFORGE_SKIP_BROWSER=1")
        pytest.fail("Chromium is not installed: `make test` installs it (apt-get install chromium); set LORAFORGE_SKIP_BROWSER=1 to skip")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={user_data}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, demo_kept):
    from loraforge.train.recipe import train

    out = tmp_path_factory.mktemp("report") / "run"
    train(train_config(tiny_model_dir, demo_kept, out, **{"train.max_steps": 6}), show_progress=False)
    return out


def test_collect_finds_the_gate_report_beside_the_training_data(run_dir, demo_kept):
    data = collect(run_dir)
    assert data["gate_path"] == str(demo_kept.parent / "report.json")
    assert data["gate"]["input"] == data["gate"]["kept"] + data["gate"]["rejected"]
    assert len(data["metrics"]) == 6 and data["manifest"]["status"] == "completed"
    assert data["eval"] is None and data["serving"] is None


def test_eval_table_marks_the_better_side():
    rows = {r["metric"]: r for r in eval_table({"base": {"loss": 2.0, "exact_match": 0.1}, "adapter": {"loss": 0.5, "exact_match": 0.0}})}
    assert rows["loss"]["better"] and not rows["loss"]["worse"]  # lower loss is better
    assert rows["exact_match"]["worse"] and rows["exact_match"]["delta"] == pytest.approx(-0.1)


def test_report_escapes_data_and_says_what_is_missing(run_dir, tmp_path):
    gate = json.loads((collect(run_dir)["gate_path"] and Path(collect(run_dir)["gate_path"])).read_text())
    gate["reasons"]["schema"] = 1
    gate["examples"]["schema"] = [{"source": {"file": "x.jsonl", "line": 3}, "detail": "<script>alert(1)</script>"}]
    (tmp_path / "report.json").write_text(json.dumps(gate))
    html = write_report(run_dir, out=tmp_path / "r.html", gate=tmp_path).read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Not evaluated yet" in html and "Not measured" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2  # loss + rejections
    assert "http://" not in html and "https://" not in html  # self-contained


def test_report_renders_in_headless_chromium(run_dir, tmp_path, tiny_model_dir):
    from loraforge.eval import evaluate

    test_data = tmp_path / "test.jsonl"
    from loraforge.demo.data import write_demo_data

    write_demo_data(test_data, n=6, seed=1)
    lines = [l for l in test_data.read_text().splitlines() if '"assistant"' in l][:6]
    test_data.write_text("\n".join(lines) + "\n")
    evaluate(run_dir, test_data, max_new_tokens=8, show_progress=False)
    (run_dir / "serving.json").write_text(
        json.dumps({"requests": [{"route": "lora", "latency_ms": 40 + i, "ok": True} for i in range(20)] + [{"route": "base-fallback", "latency_ms": 90, "ok": True}]})
    )
    report = write_report(run_dir)
    html = report.read_text()
    assert "Evaluation: base vs adapter" in html and "Not evaluated yet" not in html and "Not measured" not in html

    dom = chromium("--virtual-time-budget=10000", "--dump-dom", report.as_uri(), user_data=tmp_path / "chrome-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-rendered="ok"' in body, body  # every image decoded, no script error
    assert 'data-images="3"' in body and 'data-broken-images="0"' in body

    png = tmp_path / "report.png"
    shot = chromium("--window-size=1200,2400", f"--screenshot={png}", report.as_uri(), user_data=tmp_path / "chrome-shot")
    assert shot.returncode == 0 and png.stat().st_size > 20_000, shot.stderr[-2000:]
