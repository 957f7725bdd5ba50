"""Arbitrary junk in, nothing lost: every non-blank input line is kept or rejected exactly once."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge.config import load_config
from loraforge.gate import run_gate

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "gpt", "human", ""])
message = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=40)})
records = st.one_of(
    json_values.map(json.dumps),
    st.lists(message, max_size=4).map(lambda m: json.dumps({"messages": m})),
    st.fixed_dictionaries({"instruction": st.text(max_size=30), "output": st.text(max_size=30)}).map(json.dumps),
    st.text(max_size=60),  # not JSON at all
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(records, min_size=1, max_size=25))
def test_nothing_is_lost(tmp_path_factory, tiny_tokenizer, lines):
    tmp = tmp_path_factory.mktemp("junk")
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    data = tmp / "junk.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # the reader skips lines of ASCII whitespace only (a line of "\x1c" or "\u3000" is a record)
    expected = {n for n, line in enumerate(lines, start=1) if line.encode("utf-8").strip()}
    cfg = load_config(overrides={"gate.workers": 1, "gate.max_seq_length": 256})
    report = run_gate([data], tmp / "out", cfg, tokenizer=tiny_tokenizer)
    kept = [json.loads(x) for x in (tmp / "out" / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp / "out" / "rejected.jsonl").read_text().splitlines()]
    seen = [r["source"]["line"] for r in kept + rejected]
    assert sorted(seen) == sorted(expected)  # each line exactly once
    assert report.input == report.kept + report.rejected == len(expected)
    assert all(r["reason"] and r["detail"] and ("record" in r or "raw" in r) for r in rejected)
