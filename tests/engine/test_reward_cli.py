"""``engine reward score``: a reward model's scores from the command line, as text and as a reward_scores event."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from reward_helpers import MARK, train_reward_model

from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.protocol.reward_scores import RewardScores
from finetune_studio.engine.reward_model import RewardModel


def _reward(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "reward", "score", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reward_folder(tiny_model_dir, tmp_path_factory):
    result, _events, _config = train_reward_model(tiny_model_dir, tmp_path_factory.mktemp("reward"), max_steps=20)
    return result.adapter_dir


def test_scores_from_a_jsonl_file_as_one_event(reward_folder, tmp_path):
    rows = [
        {"prompt": "Say something about item 3.", "candidates": [f"salt {MARK} wind", "salt sea wind"]},
        {"prompt": "Say something about item 9.", "completion": f"hello {MARK} world"},
        {"prompt": "Say something about item 9.", "completion": "hello lazy world"},
    ]
    data = tmp_path / "answers.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    done = _reward("--model", str(reward_folder), "--input", str(data), "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1  # one event, nothing else on stdout
    event = parse_event(lines[0])
    assert isinstance(event, RewardScores) and event.model == str(reward_folder)
    pairs = [(r["prompt"], c) for r in rows for c in r.get("candidates", [r.get("completion")])]
    assert [(i.prompt, i.completion) for i in event.items] == pairs
    expected = RewardModel.load(reward_folder).score([p for p, _ in pairs], [c for _, c in pairs])
    assert event.scores == pytest.approx(expected, abs=1e-4)
    assert event.scores[0] > event.scores[1] and event.scores[2] > event.scores[3]


def test_scores_from_the_command_line_as_text(reward_folder):
    done = _reward("--adapter", str(reward_folder), "--prompt", "Name it.", "--candidate", "a", "--candidate", "b c")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[1:] for line in lines] == [["Name it.", "a"], ["Name it.", "b c"]]
    assert all(float(line.split("\t")[0]) == float(line.split("\t")[0]) for line in lines)  # numbers, not NaN


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--prompt", "p"], 2, "needs at least one --candidate"),
        (["--candidate", "a"], 2, "needs --prompt"),
        ([], 2, "nothing to score"),
        (["--prompt", "p", "--candidate", "a", "--model-is-missing"], 2, "unrecognized arguments"),
    ],
)
def test_bad_requests_say_what_to_give(tmp_path, args, code, words):
    done = _reward(*(["--model", str(tmp_path)] if "--model-is-missing" not in args else ["--model", "x"]), *args)
    assert done.returncode == code and words in done.stderr


def test_bad_input_lines_and_non_reward_folders_are_failed_events(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "completion": "a"}\n{"prompt": "p"}\n', encoding="utf-8")
    done = _reward("--model", str(tmp_path), "--input", str(data), "--json")
    failed = parse_event(done.stdout.splitlines()[-1])
    assert done.returncode == 2 and failed.type == "failed" and failed.kind == "config"
    assert "bad.jsonl:2" in failed.message and "completion" in failed.message
    done = _reward("--model", str(tiny_model_dir), "--prompt", "p", "--candidate", "a", "--json")
    failed = parse_event(done.stdout.splitlines()[-1])
    assert done.returncode == 1 and failed.kind == "model" and "not a reward model" in failed.message
