"""The engine's commands read ``--set KEY=VALUE`` through ``core.config`` and answer a bad pair with a message."""

from __future__ import annotations

import json
import subprocess

import pytest

from finetune_studio.core.paths import python_argv


def _engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*python_argv(), "-m", "finetune_studio.engine", *args], capture_output=True, text=True)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: data.jsonl\nbatch_size: 4\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--set", "lora_rank"], "lora_rank: --set takes KEY=VALUE"),
        (["--nproc", "2", "--set", "lora_rnk=4"], "did you mean 'lora_rank'"),  # the torchrun launcher checks first
    ],
)
def test_train_answers_a_bad_override_with_a_config_failure(config_file, extra, words):
    child = _engine("train", config_file, *extra)
    assert child.returncode == 2, child.stderr
    event = json.loads(child.stdout.strip().splitlines()[-1])
    assert event["type"] == "failed" and event["kind"] == "config" and words in event["message"]


def test_estimate_answers_an_unreadable_override_in_its_json(config_file):
    child = _engine("estimate", config_file, "--set", "target_modules=[q_proj", "--json")
    assert child.returncode == 2, child.stderr
    answer = json.loads(child.stdout)
    assert answer["type"] == "failed" and answer["kind"] == "config"
    assert answer["message"].startswith("Invalid config: target_modules: cannot read")


def test_demo_loop_is_chosen_by_the_command_line():
    loop = _engine("demo", "--loop", "--help")
    plain = _engine("demo", "--help")
    assert loop.returncode == 0 and plain.returncode == 0, loop.stderr + plain.stderr
    assert "demo --loop" in loop.stdout and "--candidates" in loop.stdout
    assert "--candidates" not in plain.stdout and "--objective" in plain.stdout
