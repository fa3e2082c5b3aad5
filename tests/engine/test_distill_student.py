"""A distillation run's student made by the engine (``distill_student_layers``: the model pruned to N layers, in the
run's folder, reused on resume) and its generation speed beside the teacher's (the ``distill_speed`` event, kept in
the store)."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.store import Store
from finetune_studio.engine.train.distill_speed import prompt_ids, time_generation
from finetune_studio.engine.train.recipe import StopFlag, TrainingFailed, train_run
from finetune_studio.engine.train.reporting import Reporter


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-4"), layers=4)


def _config(model_dir, data, **kw):
    kw.setdefault("compute_dtype", "float32")
    return tiny_config(
        model_dir, data, objective="distill", distill_teacher=str(model_dir), learning_rate=3e-2, max_steps=4, **kw
    )


def test_the_student_is_the_model_pruned_and_its_speed_is_measured_and_stored(four_layers, tmp_path):
    config = _config(four_layers, write_sft(tmp_path / "d.jsonl"), distill_student_layers=2)
    rec = Recorder()
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed"
    student = result.run_dir / "student"
    record = json.loads((student / "pruning.json").read_text())
    assert len(record["kept_layers"]) == 2 and record["num_layers_before"] == 4 and record["measure"] == "kl"
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2
    started = rec.of("started")[0]
    assert started.total_params - started.trainable_params == record["params_after"] < record["params_before"]
    assert rec.of("step")[0].metrics["kl"] > 0  # half the teacher's layers: not the teacher any more

    (speed,) = rec.of("distill_speed")
    assert (speed.teacher_layers, speed.student_layers) == (4, 2)
    assert (speed.teacher_params, speed.student_params) == (record["params_before"], record["params_after"])
    assert speed.prompts > 0 and speed.new_tokens == 48
    for figure in ("teacher_tokens_per_s", "teacher_tokens_per_cpu_s", "student_tokens_per_s"):
        assert getattr(speed, figure) > 0
    assert rec.events.index(speed) < rec.events.index(rec.of("finished")[0])  # before the run's end
    store = Store()
    assert store.distill_speed(result.run_id) == speed  # what the app reads for the run
    store.close()


def test_a_resumed_run_reuses_its_student(four_layers, tmp_path):
    config = _config(
        four_layers, write_sft(tmp_path / "d.jsonl"), distill_student_layers=3, distill_measure_speed=False
    )
    stop, first = StopFlag(), Recorder()

    def stop_at_two(event):
        first(event)
        if event.type == "step" and event.step == 2:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_two), stop=stop)
    assert stopped.status == "stopped"
    weights = stopped.run_dir / "student" / "model.safetensors"
    made = weights.stat().st_mtime_ns
    second = Recorder()
    done = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert done.status == "completed" and not second.of("distill_speed")  # measuring switched off
    assert weights.stat().st_mtime_ns == made
    assert any("pruned when this run started" in e.message for e in second.of("log"))


def test_as_many_layers_as_the_model_has_is_refused_by_name(four_layers, tmp_path):
    config = _config(four_layers, write_sft(tmp_path / "d.jsonl"), distill_student_layers=4)
    with pytest.raises(TrainingFailed, match="distill_student_layers: must be below the model's 4 layers"):
        train_run(config)


def test_the_models_take_turns_and_every_answer_has_the_asked_length(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    calls: list[str] = []

    class Counting(torch.nn.Module):
        def __init__(self, name, model):
            super().__init__()
            self.name, self.model = name, model

        def generate(self, **kw):
            calls.append(self.name)
            return self.model.generate(**kw)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    timed = time_generation({"a": Counting("a", model), "b": Counting("b", model)}, [[5, 6, 7], [8, 9]], 6, pad_id=0)
    assert calls == ["a", "b"] * 3  # the warm-up, then prompt by prompt
    assert all(wall > 0 and cpu > 0 for wall, cpu in timed.values())


def test_prompts_are_the_tokens_before_the_first_trained_one():
    from types import SimpleNamespace

    rows = [
        SimpleNamespace(input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4]),
        SimpleNamespace(input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4]),  # the same prompt again
        SimpleNamespace(input_ids=[9, 8, 7], labels=[-100, 8, 7]),
    ]
    assert prompt_ids(rows, 5) == [[1, 2], [9]]
    assert prompt_ids(rows, 5, most=1) == [[2], [9]]


def test_through_the_command_line_a_full_fine_tune_of_a_pruned_student_prints_and_stores_its_speed(
    four_layers, tmp_path, studio_home
):
    import subprocess
    import sys
    from pathlib import Path

    from finetune_studio.core.protocol.events import parse_event

    config = _config(four_layers, write_sft(tmp_path / "d.jsonl"), method="full", distill_student_layers=2)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    out = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "train", str(path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    events = [parse_event(line) for line in out.stdout.splitlines() if line.strip()]
    (speed,) = [e for e in events if e.type == "distill_speed"]  # what the app reads from the engine's stdout
    assert (speed.teacher_layers, speed.student_layers) == (4, 2) and speed.student_tokens_per_s > 0
    started = next(e for e in events if e.type == "started")
    assert started.trainable_params == started.total_params == speed.student_params  # every weight of the student
    assert Store().distill_speed(started.run_id) == speed  # and from the store, as the app's Runs page does
    saved = Path(started.run_dir) / "adapter"
    assert json.loads((saved / "config.json").read_text())["num_hidden_layers"] == 2
