"""The engine under faults (issue 8): memory guard, stale pids, CPU out of memory, a corrupt database, set-up
stop, leftovers of killed processes."""

from __future__ import annotations

import pytest
from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.store import Store
from finetune_studio.engine.reporting import Reporter
from finetune_studio.engine.train import TrainingFailed, train_run


def _failed(config):
    rec = Recorder()
    with pytest.raises(TrainingFailed) as info:
        train_run(config, reporter=Reporter(extra=rec))
    (failed,) = rec.of("failed")
    run = Store().get_run(info.value.result.run_id)
    assert run["status"] == "failed" and run["error_kind"] == failed.kind
    return failed


def test_a_rank_above_the_layer_width_is_refused_naming_the_field(tmp_path, tiny_model_dir):
    failed = _failed(tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), lora_rank=1_000_000))
    assert failed.kind == "config" and "lora_rank" in failed.message and "at most 64" in failed.message


def test_a_run_the_estimate_says_cannot_fit_is_refused_unless_overridden(tmp_path, tiny_model_dir):
    data = write_sft(tmp_path / "d.jsonl", n=12)
    huge = tiny_config(tiny_model_dir, data, max_length=10**8, max_steps=2)  # estimate: hundreds of GiB
    failed = _failed(huge)
    assert failed.kind == "oom" and "ignore_memory_check" in failed.message
    assert "max_length" in failed.message or "gradient checkpointing" in failed.message
    result = train_run(huge.replace(ignore_memory_check=True), reporter=Reporter(extra=Recorder()))
    assert result.status == "completed"  # the rows are short: the worst case never comes
