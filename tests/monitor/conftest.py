"""Prometheus' own binaries for the monitoring tests: required, unless explicitly waived.

Called from the test body, not a fixture, so that a missing binary is a test failure (a
fixture's would be reported as an error).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"


def prometheus_binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; a failure saying how to get it, or a skip when waived."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("LORAFORGE_SKIP_PROMETHEUS") == "1":
        pytest.skip(f"{name} is not on PATH and LORAFORGE_SKIP_PROMETHEUS=1")
    pytest.fail(
        f"{name} is not on PATH. `make test` installs it (apt-get install prometheus); "
        "or set LORAFORGE_SKIP_PROMETHEUS=1 to skip the monitoring tests that need it.",
        pytrace=False,
    )

