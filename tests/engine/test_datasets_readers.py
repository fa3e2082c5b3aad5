"""File formats and sources: every container read the same way, hostile files refused with a clear message."""

from __future__ import annotations

import gzip
import json

import pytest

from finetune_studio.engine.datasets import DatasetError, load_dataset, readers
from finetune_studio.engine.datasets.schema import Message

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add", "input": "2+2", "output": "4"},
    {"instruction": "Capital of France?", "input": "", "output": "Paris"},
]
EXPECTED = [
    (Message("user", "Say hi"), Message("assistant", "Hi!")),
    (Message("user", "Add\n2+2"), Message("assistant", "4")),
    (Message("user", "Capital of France?"), Message("assistant", "Paris")),
]


def _messages(ds):
    return [ex.messages for ex in ds.examples]


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2))
    ds = load_dataset(path)
    assert (ds.format, ds.kind, ds.rows_read) == ("alpaca", "sft", 3)
    assert _messages(ds) == EXPECTED
    assert [ex.source_line for ex in ds.examples] == [2, 7, 12]  # the line where each object starts


def test_json_list_streams_across_chunks(tmp_path, monkeypatch):
    """Elements split by the read window, numbers cut at a boundary, and a BOM all decode correctly."""
    monkeypatch.setattr(readers, "_CHUNK", 7)
    rows = [{"text": "é" * (i % 5) + f"row {i}", "n": 1234567 + i} for i in range(40)]
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    ds = load_dataset(path)
    assert [ex.text for ex in ds.examples] == [r["text"] for r in rows]


def test_jsonl_reports_malformed_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(ROWS[0]), "{not json", "", json.dumps([1, 2]), json.dumps(ROWS[1])]
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path)
    assert _messages(ds) == EXPECTED[:2]
    assert [ex.source_line for ex in ds.examples] == [1, 5]
    bad = {p.line: p for p in ds.problems}
    assert set(bad) == {2, 4}
    assert "not valid JSON" in bad[2].message and bad[2].level == "dropped" and bad[2].file == str(path)
    assert "expected a JSON object" in bad[4].message
    assert ds.rows_read == 4 and sum(ds.dropped.values()) == 2


def test_jsonl_saved_as_json_is_read_line_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    ds = load_dataset(path)
    assert _messages(ds) == EXPECTED
    assert any("JSON Lines" in p.message for p in ds.problems)


def test_json_wrapper_object_and_trailing_comma(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert _messages(load_dataset(wrapped)) == EXPECTED
    trailing = tmp_path / "trailing.json"
    trailing.write_text(json.dumps(ROWS)[:-1] + ",\n]")
    ds = load_dataset(trailing)
    assert _messages(ds) == EXPECTED and any("trailing comma" in p.message for p in ds.problems)


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delimiter):
    import csv

    path = tmp_path / f"data{suffix}"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Say hi", "", "Hi!"])
        writer.writerow(["Add", "2+2"])  # wrong number of fields
        writer.writerow(["Add", "2+2", "4"])
        writer.writerow(["Capital of France?", "", "Paris"])
    ds = load_dataset(path)
    assert _messages(ds) == EXPECTED
    assert [ex.source_line for ex in ds.examples] == [2, 4, 5]
    [bad] = ds.problems
    assert bad.line == 3 and "2 fields, the header has 3" in bad.message


def test_csv_cells_with_json_lists_and_multiline_quotes(tmp_path):
    path = tmp_path / "chat.csv"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello,\nfriend"}]
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(msgs)])
        writer.writerow([json.dumps(msgs[:1] + [{"role": "assistant", "content": "Yo"}])])
    ds = load_dataset(path)
    assert ds.format == "messages"
    assert ds.examples[0].messages[1].content == "Hello,\nfriend"
    assert ds.examples[1].source_line == 3


def test_parquet_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(2500)]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    ds = load_dataset(path)
    assert (ds.format, ds.kind, len(ds.examples)) == ("trl", "preference", 2500)
    last = ds.examples[-1]
    assert last.source_line == 2500
    assert (last.prompt, last.chosen, last.rejected) == (
        (Message("user", "q2499"),),
        (Message("assistant", "good 2499"),),
        (Message("assistant", "bad 2499"),),
    )


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    import datasets

    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ds_train = datasets.Dataset.from_list([{"messages": conv}] * 3)
    ds_test = datasets.Dataset.from_list([{"messages": conv[:1] + [{"role": "assistant", "content": "Yo"}]}])
    ds_train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds_train, "test": ds_test}).save_to_disk(str(tmp_path / "dict"))

    single = load_dataset(tmp_path / "single")
    assert single.format == "messages" and len(single.examples) == 3
    assert single.examples[0].messages == (Message("user", "Hi"), Message("assistant", "Hello"))

    both = load_dataset(tmp_path / "dict")
    assert len(both.examples) == 3 and any("also has: test" in p.message for p in both.problems)
    test = load_dataset(tmp_path / "dict", {"split": "test"})
    assert test.examples[0].messages[1].content == "Yo"
    with pytest.raises(DatasetError, match="no split 'validation'"):
        load_dataset(tmp_path / "dict", {"split": "validation"})


def test_hub_dataset_from_the_local_cache(tmp_path, monkeypatch):
    """An `owner/name` id is read from the hub cache without any network access."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "hub"
    snap = cache / "datasets--someone--toy" / "snapshots" / "abc123"
    (snap / "data").mkdir(parents=True)
    (cache / "datasets--someone--toy" / "refs").mkdir()
    (cache / "datasets--someone--toy" / "refs" / "main").write_text("abc123")
    pq.write_table(pa.Table.from_pylist([{"text": "train doc"}]), snap / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "test doc"}]), snap / "data" / "test-00000-of-00001.parquet")
    (snap / "README.md").write_text("# toy")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert [ex.text for ex in load_dataset("someone/toy").examples] == ["train doc"]
    assert [ex.text for ex in load_dataset("someone/toy", {"split": "test"}).examples] == ["test doc"]
    with pytest.raises(DatasetError, match="not in the local Hugging Face cache"):
        load_dataset("someone/absent")


def _refused(tmp_path, name: str, content: bytes, match: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        load_dataset(path)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.jsonl", b"", "is empty"),
        ("blank.json", b"  \n\n ", "only whitespace"),
        ("binary.jsonl", bytes(range(256)) * 4, "binary file"),
        ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), "not valid UTF-8.*line 1"),
        (
            "late-latin1.jsonl",
            b'{"text": "ok"}\n' * 3 + '{"text": "café"}\n'.encode("latin-1"),
            "not valid UTF-8.*line 4",
        ),
        ("utf16.json", '[{"text": "hi"}]'.encode("utf-16"), "UTF-16"),
        ("gz.jsonl", gzip.compress(b'{"text": "hi"}\n'), "gzip"),
        ("numbers.json", b"[1, 2, 3]", "list of objects.*first element is a number"),
        ("scalar.json", b'"hello"', "holds a string, not a list of objects"),
        ("object.json", b'{"text": "a single row"}', "single JSON object"),
        ("broken.json", b'[\n{"text": "a"},\n{"text": "b" "c"}\n]', "not valid JSON.*line 3"),
        ("unclosed.json", b'[{"text": "a"}, {"text": "b"}', "not closed"),
        ("noheader.csv", b"What is 2+2?,4\nCapital of France?,Paris\n", "does not look like a header"),
        ("dupheader.csv", b"text,text\na,b\n", "repeated column names"),
        ("unknown.csv", b"Hello,Bonjour\nBye,Au revoir\n", "could not recognise.*Hello.*add a header row"),
        ("fake.parquet", b"not parquet at all", "not a Parquet file"),
        ("all-bad.jsonl", b"{oops\n[1]\n", "no usable rows.*every row is malformed"),
        ("only-empty-output.json", b'[{"instruction": "a", "output": ""}]', "no usable rows.*empty 'output'"),
        ("notes.txt", b"just some notes", "unknown file type"),
    ],
)
def test_hostile_files_get_a_clear_error(tmp_path, name, content, match):
    _refused(tmp_path, name, content, match)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")


def test_folder_of_plain_files_prefers_train(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    (tmp_path / "d" / "validation.jsonl").write_text(json.dumps({"text": "v"}) + "\n")
    (tmp_path / "d" / "dataset_info.json").write_text("{}")
    assert [ex.text for ex in load_dataset(tmp_path / "d").examples] == ["t"]
    assert [ex.text for ex in load_dataset(tmp_path / "d", {"split": "validation"}).examples] == ["v"]


def test_reading_data_does_not_import_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys; from finetune_studio.engine.datasets import load_dataset; "
        f"assert len(load_dataset({str(path)!r}).examples) == 3; print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-P", "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
