"""Hostile data files: one very long row, deeply nested JSON, an unterminated CSV quote (issue 8)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune_studio.engine.datasets import load_dataset
from finetune_studio.engine.datasets.bound import char_budget

MIB = 1024 * 1024
# Runs the engine's inspect as its only child and prints that child's peak resident memory (kB on Linux).
_MEASURE = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(r.stderr)\n"
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.stdout.write(r.stdout)\n"
)


def _long_row_file(path, mib: int):
    filler = ("lorem ipsum dolor sit amet " * (mib * MIB // 27 + 1))[: mib * MIB]
    rows = [
        {"instruction": "Summarise this.", "input": filler, "output": "A long text."},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_one_long_row_is_cut_before_tokenising_within_a_memory_bound(tmp_path, tiny_model_dir):
    path = _long_row_file(tmp_path / "long.jsonl", 30)
    argv = [sys.executable, "-P", "-m", "finetune_studio.engine", "data", "inspect", str(path), "--json"]
    argv += ["--model", str(tiny_model_dir), "--max-length", "128"]
    run = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, timeout=300)
    head, _, out = run.stdout.partition("\n")
    code, peak_kb = map(int, head.split())
    peak_mib = peak_kb / 1024
    print(f"data inspect of a {path.stat().st_size / MIB:.0f} MiB row: peak RSS {peak_mib:.0f} MiB")
    assert code == 0, run.stderr[-2000:]
    report = json.loads(out)
    assert report["rows"] == 2
    cut = [p for p in report["problems"] if "cut to" in p["message"]]
    assert cut and cut[0]["line"] == 1, report["problems"]
    assert report["tokens"]["over_max_length"] == 1
    # The row alone is 30 MiB; holding it a few times over is fine, tokenising it whole (GBs) is not.
    assert peak_mib < 1500, f"peak {peak_mib:.0f} MiB"


def test_cut_keeps_the_start_of_answers_and_the_end_of_prompts(tmp_path):
    budget = char_budget(64)
    long_prompt = "p" * (3 * budget) + "END"
    long_answer = "START" + "a" * (3 * budget)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": long_prompt, "chosen": long_answer, "rejected": "no"}) + "\n")
    ds = load_dataset(path, max_length=64)
    pair = ds.examples[0]
    assert pair.prompt[-1].content.endswith("END") and len(pair.prompt[-1].content) <= budget
    assert pair.chosen[-1].content.startswith("START") and len(pair.chosen[-1].content) <= budget
    assert pair.rejected[-1].content == "no"
    assert any("cut to" in p.message and p.line == 1 for p in ds.problems)
    # Without max_length nothing is cut.
    assert load_dataset(path).examples[0].prompt[-1].content == long_prompt


def test_a_line_too_long_to_read_is_dropped_with_its_number(tmp_path, monkeypatch):
    from finetune_studio.engine.datasets import readers

    monkeypatch.setattr(readers, "MAX_LINE", 1000)
    path = tmp_path / "huge.jsonl"
    rows = [{"text": "short"}, {"text": "x" * 5000}, {"text": "after"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path)
    assert [ex.text for ex in ds.examples] == ["short", "after"]
    assert [p.line for p in ds.problems if p.level == "dropped"] == [2]


def test_a_deeply_nested_line_is_dropped_with_its_number(tmp_path):
    path = tmp_path / "nested.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        json.dumps({"text": "first"}),
        '{"text": ' + deep + "}",
        '{"text": "third", "extra": ' + "[" * 900 + "]" * 900 + "}",
        json.dumps({"text": "last"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path)
    assert [ex.text for ex in ds.examples] == ["first", "third", "last"]
    assert [(p.line, "nested too deeply" in p.message) for p in ds.problems if p.level == "dropped"] == [(2, True)]


def test_a_deeply_nested_json_list_element_names_its_line(tmp_path):
    from finetune_studio.engine.datasets import DatasetError

    path = tmp_path / "nested.json"
    path.write_text('[{"text": "a"},\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(DatasetError, match="line 2 .*nested too deeply"):
        load_dataset(path)


def test_an_unterminated_csv_quote_names_its_line(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('instruction,output\nfirst,one\nsecond,"two\nthird,three\nfourth,four\n')
    ds = load_dataset(path)
    assert [ex.messages[0].content for ex in ds.examples] == ["first"]
    (problem,) = [p for p in ds.problems if p.level == "dropped"]
    assert problem.line == 3 and "never closed" in problem.message and "lines 3 to 5" in problem.message
    # Quotes that do close, across lines and doubled inside a cell, are read as before.
    path.write_text('instruction,output\n"multi\nline","say ""hi"""\nnext,row\n')
    ds = load_dataset(path)
    assert [ex.messages[-1].content for ex in ds.examples] == ['say "hi"', "row"]
    assert not [p for p in ds.problems if p.level == "dropped"]


def test_a_tokenizer_with_custom_code_is_refused_without_a_prompt(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "custom-code-ran"
    (model / "my_tokenizer.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass MyTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "my_tokenizer.MyTokenizer"]}
    config.pop("tokenizer_class", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    argv = [sys.executable, "-P", "-m", "finetune_studio.engine", "data", "inspect", str(data), "--json"]
    run = subprocess.run(
        [*argv, "--model", str(model)], stdin=subprocess.PIPE, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)  # the whole of stdout is one JSON object: no prompt in it
    assert not marker.exists()
    notes = [p["message"] for p in report["problems"] if "trust_remote_code" in p["message"]]
    assert notes and "--trust-remote-code" in notes[0], report["problems"]
    assert report["tokens"] is None


def test_training_on_a_file_with_one_long_row_stays_within_a_memory_bound(tmp_path, tiny_model_dir):
    path = tmp_path / "long.jsonl"
    filler = ("lorem ipsum dolor sit amet " * (30 * MIB // 27 + 1))[: 30 * MIB]
    rows = [{"instruction": "Summarise this.", "input": filler, "output": "A long text."}]
    rows += [{"instruction": f"What is {i} plus {i}?", "output": f"{2 * i}"} for i in range(15)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndataset: {path}\nmax_steps: 2\nbatch_size: 2\nmax_length: 128\n"
        "lora_rank: 4\neval_every: 0\ncheckpoint_every: 0\nvalidation_fraction: 0.0\n"
    )
    argv = [sys.executable, "-P", "-m", "finetune_studio.engine", "train", str(config)]
    run = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, timeout=300)
    head, _, out = run.stdout.partition("\n")
    code, peak_kb = map(int, head.split())
    print(f"train with a 30 MiB row: peak RSS {peak_kb / 1024:.0f} MiB")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[-1]["type"] == "finished", run.stderr[-2000:]
    assert any(e["type"] == "log" and "cut to" in e["message"] for e in events)
    assert peak_kb / 1024 < 1500
