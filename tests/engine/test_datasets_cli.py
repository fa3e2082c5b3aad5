"""`python -m finetune_studio.engine data inspect`: the report, the statistics and the preview as training sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_studio.core.protocol.dataset_report import DatasetReport, LengthStats, RenderedSequence
from finetune_studio.core.protocol.events import Failed, parse_event
from finetune_studio.engine.cli.data import main

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _inspect(capsys, *args):
    """(exit code, the reply as the studio parses it: a DatasetReport or a Failed event, stderr)."""
    code = main(["inspect", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # exactly one JSON line on stdout
    reply = parse_event(lines[0])
    assert isinstance(reply, DatasetReport if code == 0 else Failed), reply
    return code, reply, err


def _trained_text(sequence: RenderedSequence) -> str:
    return "".join(s.text for s in sequence.segments if s.trained)


def test_sft_preview_marks_the_assistant_turn(tmp_path, capsys, tiny_model_dir):
    path = _write(
        tmp_path,
        "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]},
        ],
    )
    code, report, err = _inspect(capsys, path, "--model", tiny_model_dir)
    assert code == 0 and "Traceback" not in err
    assert (report.format, report.kind, report.rows, report.problems) == ("messages", "sft", 2, ())
    ex = report.example.sequence
    assert ex.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert [(s.text, s.trained) for s in ex.segments] == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>\n", True),
    ]
    assert ex.trained_tokens == ex.segments[1].tokens
    assert (report.model, report.loss_on, report.tokens.max_length) == (str(tiny_model_dir), "assistant", 512)

    code, everything, _ = _inspect(capsys, path, "--model", tiny_model_dir, "--loss-on", "all", "--row", 2)
    assert [s.trained for s in everything.example.sequence.segments] == [True]
    assert "See you" in everything.example.sequence.text


def test_token_statistics_match_the_renderer(tmp_path, capsys, tiny_model_dir):
    from transformers import AutoTokenizer

    from finetune_studio.engine.datasets import load_dataset
    from finetune_studio.engine.datasets.render import tokenize_example

    rows = [{"instruction": "Say " + "word " * n, "output": "ok " * n} for n in (1, 5, 20, 40, 80)]
    path = _write(tmp_path, "alpaca.jsonl", rows)
    code, report, _ = _inspect(capsys, path, "--model", tiny_model_dir, "--max-length", 200)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    lengths = sorted(len(tokenize_example(tok, ex, 10**6).input_ids) for ex in load_dataset(path).examples)
    stats = report.tokens
    assert stats.lengths == LengthStats(count=5, min=lengths[0], median=lengths[2], p95=lengths[4], max=lengths[4])
    assert stats.over_max_length == sum(n > 200 for n in lengths) > 0
    assert any("longer than max_length 200" in p.message for p in report.problems)


def test_preference_preview_stats_and_truncated_difference(tmp_path, capsys, tiny_model_dir):
    shared = "The quick brown fox jumps over the lazy dog. " * 6
    rows = [
        {"prompt": "2+2?", "chosen": "It is 4.", "rejected": "5"},
        {"prompt": "Story?", "chosen": shared + "The end.", "rejected": shared + "No."},
    ]
    path = _write(tmp_path, "prefs.jsonl", rows)
    code, report, _ = _inspect(capsys, path, "--model", tiny_model_dir, "--max-length", 64)
    assert code == 0 and report.kind == "preference"
    ex = report.example
    assert _trained_text(ex.chosen) == "It is 4.<|im_end|>\n"
    assert _trained_text(ex.rejected) == "5<|im_end|>\n"
    assert ex.chosen.text.startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert report.tokens.difference_truncated == 1
    cut = [p for p in report.problems if "differ only after max_length" in p.message]
    assert [p.line for p in cut] == [2]
    bias = report.length_bias
    assert bias.unit == "tokens" and bias.pairs == 2 and bias.chosen_longer_share == 1.0
    assert bias.mean_chosen > bias.mean_rejected


def test_without_a_tokenizer_the_report_still_comes(tmp_path, capsys):
    path = _write(tmp_path, "prefs.jsonl", [{"prompt": "q", "chosen": "long answer", "rejected": "no"}])
    code, report, _ = _inspect(capsys, path, "--model", tmp_path / "no-such-model")
    assert code == 0 and report.rows == 1 and report.tokens is None and report.model == ""
    assert any(p.message.startswith("no tokenizer") for p in report.problems)
    assert report.length_bias.unit == "characters"
    assert not report.example.rendered
    assert report.example.data["chosen"] == [{"role": "assistant", "content": "long answer"}]


def test_length_bias_warning(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "a long and careful answer", "rejected": "no"} for i in range(12)]
    code, report, _ = _inspect(capsys, _write(tmp_path, "p.jsonl", rows), "--model", tmp_path / "none")
    assert any(p.message.startswith("length bias: the chosen answer is longer in 100%") for p in report.problems)


def test_human_readable_report(tmp_path, capsys, tiny_model_dir):
    path = _write(tmp_path, "chat.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "x"}])
    assert main(["inspect", str(path), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "format:  alpaca (sft)" in out and "rows:    1 usable of 2 read" in out
    assert "line 2: missing 'output'" in out
    assert "<|im_start|>assistant\n[[Hello<|im_end|>\n]]" in out


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is empty"),
        (b"\x00\x01\x02binary", "binary file"),
        (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
        (b'{"a": 1}', "single JSON object"),
    ],
)
def test_unusable_file_json_error(tmp_path, capsys, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    code, report, err = _inspect(capsys, path)
    assert code == 1 and report.kind == "data"
    assert match in report.message and match in err
    assert "Traceback" not in err


def test_cli_subprocess_exit_codes_and_no_traceback(tmp_path):
    noheader = tmp_path / "noheader.csv"
    noheader.write_text("What is 2+2?,4\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "data", "inspect", str(noheader)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "does not look like a header" in run.stderr and "Traceback" not in run.stderr
    usage = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "data", "inspect"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_bad_mapping_argument(tmp_path, capsys):
    path = _write(tmp_path, "t.jsonl", [{"text": "x"}])
    code, report, _ = _inspect(capsys, path, "--mapping", "{not json")
    assert code == 1 and "--mapping is not valid JSON" in report.message
