"""The gate's defaults on real data nobody here wrote (skipped when ../shared is absent)."""

import json

import pytest

from loraforge.gate import run_gate


@pytest.mark.slow
def test_defaults_keep_real_data(tmp_path, alpaca_file, sharegpt_file, embedded_tokenizer):
    report = run_gate([alpaca_file, sharegpt_file], tmp_path / "out", tokenizer=embedded_tokenizer)
    alpaca, sharegpt = report.files
    print(f"\ngate on real data: {report.reasons}; alpaca kept {alpaca.kept}/{alpaca.input}, sharegpt kept {sharegpt.kept}/{sharegpt.input}")
    assert alpaca.kept / alpaca.input >= 0.98
    assert report.input == 1500 == report.kept + report.rejected
    # the ShareGPT file is templated identity chat: what goes is duplicates, nothing else
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejected} <= {"exact_duplicate", "near_duplicate"}
