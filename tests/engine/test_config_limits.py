"""Out-of-range and infinite config values through the real entry points (``engine train CONFIG`` and ``engine
estimate CONFIG --json``): a failed event of kind config that names the field and its allowed range, and no run
folder or run row left behind."""

from __future__ import annotations

import json
import subprocess

import pytest
from engine_helpers import write_sft

from finetune_studio.core.paths import data_dir, python_argv
from finetune_studio.core.store import Store

CASES = [
    # (field, the value as written in a YAML config, words of the allowed range)
    ("num_epochs", ".inf", "from 0 to 1,000,000"),
    ("max_steps", "1.0e+30", "from 1 to 1,000,000,000"),
    ("seed", str(2**70), "from 0 to 4,294,967,295"),
    ("gradient_accumulation_steps", "1.0e+9", "from 1 to 4,096"),
    ("num_threads", "1000000", "from 0 to 1,024"),
    ("lora_alpha", "inf", "at most 1,000,000"),
    ("lora_alpha", str(10**400), "finite"),
    ("learning_rate", ".nan", "between 0 and 1"),
    ("max_grad_norm", ".inf", "finite"),
]


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*python_argv(), "-m", "finetune_studio.engine", *args], capture_output=True, text=True, timeout=300
    )


def _failed(stdout: str) -> dict:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["type"] == "failed"]
    assert len(failed) == 1, stdout
    return failed[0]


@pytest.mark.parametrize("field, value, allowed", CASES, ids=[f"{f}={v[:12]}" for f, v, _ in CASES])
def test_train_refuses_the_value_naming_the_field_and_leaves_no_run(tmp_path, tiny_model_dir, field, value, allowed):
    dataset = write_sft(tmp_path / "d.jsonl", n=8)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: {dataset}\n{field}: {value}\n", encoding="utf-8")
    done = _engine("train", str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    failed = _failed(done.stdout)
    assert failed["kind"] == "config" and f"{field}:" in failed["message"] and allowed in failed["message"], failed
    assert "Traceback" not in done.stderr
    runs = data_dir() / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no orphan run folder
    store = Store()
    assert store.list_runs() == []
    store.close()


@pytest.mark.parametrize("field, value, allowed", CASES[:4], ids=[f for f, _, _ in CASES[:4]])
def test_estimate_refuses_the_value_naming_the_field(tmp_path, tiny_model_dir, field, value, allowed):
    dataset = write_sft(tmp_path / "d.jsonl", n=8)
    config = tmp_path / "run.json"
    number = {".inf": "Infinity", "1.0e+30": "1e30", "1.0e+9": "1e9"}.get(value, value)  # the JSON spelling
    config.write_text(f'{{"model": "{tiny_model_dir}", "dataset": "{dataset}", "{field}": {number}}}')
    done = _engine("estimate", str(config), "--json")
    assert done.returncode == 2, done.stderr[-2000:]
    failed = _failed(done.stdout)
    assert failed["kind"] == "config" and f"{field}:" in failed["message"] and allowed in failed["message"], failed
