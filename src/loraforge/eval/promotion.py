"""The promotion gate: does the adapter earn its deployment?

Two kinds of checks, each a ``Check(requirement, value, passed)``:

* ``--require "exact_match>=0.8"`` (repeatable): one of the adapter's metrics against a number,
  with ``>=``, ``>``, ``<=``, ``<`` or ``==`` (``==`` within 1e-9).
* ``--require-better-than-base``: the adapter beats the base model on the task's primary metric
  (``field_accuracy`` for json, ``rouge_l`` for text; strictly higher) and has a lower loss.

Requirements are parsed and their metric names checked before any model is loaded, so a typo
costs nothing.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass, field

from loraforge.errors import ConfigError, PromotionFailed
from loraforge.eval.metrics import PRIMARY, improved, metric_names

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": lambda a, b: math.isclose(a, b, rel_tol=0, abs_tol=1e-9)}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z_]\w*)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Check:
    requirement: str
    value: float
    passed: bool


@dataclass
class Promotion:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    def raise_if_failed(self) -> None:
        if not self.passed:
            details = "; ".join(f"{c.requirement} failed (adapter: {c.value:.4g})" for c in self.failures())
            raise PromotionFailed(f"the adapter does not earn its deployment: {details}")


def parse_requirement(text: str) -> Requirement:
    match = _REQUIREMENT.match(text)
    if match is None:
        raise ConfigError(f"--require {text!r}: expected METRIC OP NUMBER with OP one of >=, >, <=, <, ==, e.g. --require 'exact_match>=0.8'")
    metric, op, number = match.groups()
    return Requirement(metric, op, float(number))


def check_known(requirements: list[Requirement], task: str) -> None:
    """Refuse metric names the task's results will not carry, naming the ones they will."""
    known = metric_names(task)
    for r in requirements:
        if r.metric not in known:
            raise ConfigError(f"--require {r}: unknown metric {r.metric!r} for the {task} task; known: {', '.join(known)}")


def check_requirements(requirements: list[Requirement], adapter: dict[str, float]) -> list[Check]:
    checks = []
    for r in requirements:
        value = adapter[r.metric]
        checks.append(Check(str(r), value, bool(_OPS[r.op](value, r.threshold))))
    return checks


def better_than_base(task: str, base: dict[str, float], adapter: dict[str, float]) -> list[Check]:
    primary = PRIMARY[task]
    return [
        Check(f"{primary} > base ({base[primary]:.4g})", adapter[primary], improved(primary, base[primary], adapter[primary])),
        Check(f"loss < base ({base['loss']:.4g})", adapter["loss"], improved("loss", base["loss"], adapter["loss"])),
    ]


def decide(requirements: list[Requirement], require_better_than_base: bool, task: str, base: dict, adapter: dict) -> Promotion:
    checks = check_requirements(requirements, adapter)
    if require_better_than_base:
        checks += better_than_base(task, base, adapter)
    return Promotion(checks)
