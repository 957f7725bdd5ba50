"""The data gate: stop bad samples before they waste a training run.

Public API::

    from loraforge.gate import run_gate
    report = run_gate(["data.jsonl"], "gated/")   # kept.jsonl, rejected.jsonl, report.json
    report.kept, report.rejected, report.reasons
"""

from loraforge.gate.pipeline import run_gate
from loraforge.gate.report import GateReport
from loraforge.gate.verdict import Reason, Reject, Sample

__all__ = ["GateReport", "Reason", "Reject", "Sample", "run_gate"]
