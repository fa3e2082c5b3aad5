"""Distillation as a person sets it up on a 1024 x 768 screen, through the window system only: Set up → Distil, the
teacher typed in, the student chosen by keyboard as "this model with 2 layers" (of the tiny model's 4), Ctrl+Return;
Train brings the Distillation tab forward with the divergence to the teacher and the task loss charted, and at the
run's end the student's generation speed beside the teacher's; Runs shows the same line for the run. The database
holds the run's config, its KL and CE by step and by evaluation, and the speed record the line was made from."""

from __future__ import annotations

import json
import math
import re
import time

from conftest import off_screen, wait_for

from finetune_studio.core.store import Store
from finetune_studio.studio.state.distill import speed_line

STEPS = 4
SPEED = re.compile(
    r"^Generation: student [\d,.]+ tok/s \(2 layers\) vs teacher [\d,.]+ tok/s \(4 layers\): [\d.]+× (faster|slower)"
    r" · per CPU second [\d,.]+ vs [\d,.]+ tok: [\d.]+× (faster|slower)$"
)


def _models(tmp_path):
    from tiny_model import build_tiny_model_dir

    student = build_tiny_model_dir(tmp_path / "student", layers=4, seed=0)
    teacher = build_tiny_model_dir(tmp_path / "teacher", layers=4, seed=1)  # the same tokenizer, other weights
    data = tmp_path / "sums.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for i in range(24):
            turns = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            fh.write(json.dumps({"messages": turns}) + "\n")
    return student, teacher, data


def test_distil_into_a_pruned_student_shows_kl_ce_and_the_speed_beside_the_teacher(app_factory, tmp_path):
    student, teacher, data = _models(tmp_path)
    settings = {  # a short run, as a person trying it sets it (the form's other settings)
        "last_config": {
            "model": str(student),
            "dataset": str(data),
            "max_steps": STEPS,
            "batch_size": 2,
            "max_length": 64,
            "eval_every": 2,
            "max_eval_examples": 4,
            "sample_max_new_tokens": 8,
            "run_name": "distil-e2e",
        }
    }
    app = app_factory(size=(1024, 768), settings=settings).start()
    app.wait_text("fact_layers", lambda t: t == "4", 60, "the tiny model's layers")
    app.wait_text("datasetSummary", lambda t: "rows" in t, 60, "the dataset's check")

    # Distil: its teacher, then the student by keyboard
    app.scroll_to("objective_distill", "settingsScroll")
    app.click("objective_distill")
    app.scroll_to("studentWhole", "settingsScroll")
    assert app.widget("studentWhole")["checked"] and app.text("studentLayersOf") == "of 4 layers"
    app.click("studentWhole")
    app.key("Right")  # the other option: this model with N layers (half of them offered)
    state = app.state()
    assert state["widgets"]["studentPruned"]["checked"] and app.text("studentLayers") == "2"
    app.key("Tab", "ctrl+a")
    app.type("3")
    app.key("Down")  # back to 2, from the keyboard
    about = app.wait_text("studentAbout", lambda t: "2 of its 4" in t, 5, "the chosen student's line")
    assert about == "The engine keeps the 2 of its 4 layers that matter most on the training data."
    app.scroll_to("field_distill_teacher", "settingsScroll")
    app.fill("field_distill_teacher", str(teacher))
    wait_for(lambda: app.widget("startButton")["enabled"], 30, "Start to be enabled")
    app.scroll_to("studentLayers", "settingsScroll")
    state = app.state()
    shown = ("objective_distill", "studentWhole", "studentPruned", "studentLayers", "studentAbout", "startButton")
    assert off_screen(state, shown) == {}, off_screen(state, shown)
    assert "fieldError" not in state["widgets"]
    app.screenshot("1-setup-distil-1024")

    app.key("ctrl+Return", settle=1.0)
    wait_for(lambda: app.state()["current_tab"].endswith("Train"), 20, "the Train page")
    # the Distillation tab comes forward while the run trains
    app.wait_text("runStatus", lambda t: t == "Completed", 240, "the run to complete")
    line = app.wait_text("distillSpeed", lambda t: t.startswith("Generation"), 30, "the speed line")
    assert SPEED.match(line), line
    state = app.state()
    charts = ("chart_distill_kl", "chart_distill_ce", "distillSpeed", "runStatus", "runProgress")
    assert off_screen(state, charts) == {}, off_screen(state, charts)
    assert {"Loss and speed", "Distillation"} <= {t["text"] for t in state["tabs"]}
    assert "Rewards" not in {t["text"] for t in state["tabs"]}
    time.sleep(0.5)
    app.screenshot("2-train-distillation-1024")

    # the database: the config as chosen, KL and CE at every step and evaluation, the speed record of the line
    (run_id, config), *_ = app.query("SELECT id, config FROM runs")
    config = json.loads(config)
    assert (config["objective"], config["distill_student_layers"], config["distill_teacher"]) == (
        "distill",
        2,
        str(teacher),
    )
    train = app.query(
        "SELECT step, name, value FROM named_metrics WHERE run_id = ? AND kind = 'train' ORDER BY step", run_id
    )
    evals = app.query(
        "SELECT step, name, value FROM named_metrics WHERE run_id = ? AND kind = 'eval' ORDER BY step", run_id
    )
    assert {(s, n) for s, n, _ in train} == {(s, n) for s in range(1, STEPS + 1) for n in ("kl", "ce")}, train
    assert {(s, n) for s, n, _ in evals} >= {(s, n) for s in (2, 4) for n in ("kl", "ce")}, evals
    assert all(math.isfinite(v) and v >= 0 for _, _, v in train + evals)
    store = Store(app.home / "studio.sqlite3")
    try:
        speed = store.distill_speed(run_id)
    finally:
        store.close()
    assert speed is not None and (speed.student_layers, speed.teacher_layers) == (2, 4)
    assert speed.student_tokens_per_s > 0 and speed.teacher_tokens_per_s > 0 and line == speed_line(speed)

    # Runs: the run's line under the table
    app.key("ctrl+3")
    app.click_row("runsTable", lambda cells: "distil-e2e" in cells)
    assert app.wait_text("runsDistillSpeed", lambda t: t == line, 10, "the run's speed line in Runs")
    assert off_screen(app.state(), ("runsDistillSpeed", "runsTable")) == {}
    app.screenshot("3-runs-distillation-1024")
