import gzip
import json

import pytest

from loraforge.errors import InputError
from loraforge.gate.readers import check_inputs, read_records


def test_jsonl_lines_keep_their_numbers_and_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n   \n{broken\n')
    records = list(read_records(path, 0))
    assert [(r.line, r.text) for r in records] == [(1, b'{"a": 1}'), (3, b'{"a": 2}'), (5, b"{broken")]


def test_json_array_records_carry_their_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}], indent=2))
    records = list(read_records(path, 0))
    assert [r.value for r in records] == [{"a": 1}, {"a": 2}, {"a": 3}]
    lines = path.read_text().splitlines()
    for record in records:
        assert lines[record.line - 1].strip() == "{"


def test_json_file_with_one_object_per_line_reads_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert [r.line for r in read_records(path, 0)] == [1, 2]


def test_broken_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(InputError, match=r"d.json:3:\d+: the JSON array is broken"):
        list(read_records(path, 0))


def test_gzip_jsonl_and_json(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert len(list(read_records(path, 0))) == 2
    path = tmp_path / "d.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump([{"a": 1}], f)
    assert [r.value for r in read_records(path, 0)] == [{"a": 1}]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "completion": "a"}] * 3), path)
    records = list(read_records(path, 0))
    assert [r.line for r in records] == [0, 1, 2]
    assert records[0].value == {"prompt": "q", "completion": "a"}


def test_unusable_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        check_inputs([tmp_path / "missing.jsonl"])
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"unsupported file type '.csv'.*\.jsonl, \.ndjson, \.json, \.parquet"):
        check_inputs([tmp_path / "d.csv"])
    with pytest.raises(InputError, match="not a file"):
        check_inputs([tmp_path])
    bad = tmp_path / "d.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(read_records(bad, 0))
