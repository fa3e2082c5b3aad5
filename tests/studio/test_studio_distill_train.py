"""A distillation run on Train and in Runs: its divergence to the teacher (KL) and task loss (CE), train and eval, in
a Distillation tab that only distillations have; the student's generation speed beside the teacher's, live at the
run's end and read back from the database with the run."""

from __future__ import annotations

import pytest
from studio_support import IGNORE_OFFSCREEN, start_with

from finetune_studio.core.protocol.distill_report import DistillSpeed
from finetune_studio.core.protocol.events import Eval, Started, Step
from finetune_studio.core.store import Store
from finetune_studio.studio.state.distill import is_distill, speed_line
from finetune_studio.studio.state.run import MemoryState, RunState

pytestmark = IGNORE_OFFSCREEN

SPEED = DistillSpeed(
    prompts=4,
    new_tokens=16,
    teacher_tokens_per_s=420.0,
    teacher_tokens_per_cpu_s=270.0,
    student_tokens_per_s=812.0,
    student_tokens_per_cpu_s=540.0,
    teacher_layers=30,
    student_layers=15,
    teacher_params=134_515_008,
    student_params=71_000_000,
)
SPEED_LINE = (
    "Generation: student 812 tok/s (15 layers) vs teacher 420 tok/s (30 layers): 1.9× faster"
    " · per CPU second 540 vs 270 tok: 2.0× faster"
)


def _step(step: int, **metrics: float) -> Step:
    return Step(
        step=step,
        total_steps=6,
        loss=1.0 / step,
        lr=1e-4,
        grad_norm=0.5,
        tokens_per_s=80.0,
        memory_used_bytes=1 << 20,
        memory_peak_bytes=1 << 20,
        metrics=metrics,
    )


def _points(chart, curve: str) -> int:
    xs, _ = chart.curves[curve].getOriginalDataset()
    return 0 if xs is None else len(xs)


@pytest.fixture
def page(qtbot):
    from finetune_studio.studio.pages.train_page import TrainPage

    page = TrainPage(RunState(), MemoryState())
    qtbot.addWidget(page)
    page.resize(1000, 700)
    page.show()
    qtbot.waitExposed(page)
    return page


def test_the_speed_line_compares_the_student_with_its_teacher():
    assert speed_line(SPEED) == SPEED_LINE
    slower = DistillSpeed(teacher_tokens_per_s=50.0, student_tokens_per_s=40.0, teacher_layers=2, student_layers=1)
    # no CPU figures: the wall-clock comparison alone; a slower student says so
    assert speed_line(slower) == "Generation: student 40 tok/s (1 layer) vs teacher 50 tok/s (2 layers): 1.2× slower"


def test_a_run_is_a_distillation_by_its_objective_or_else_by_its_figures():
    assert is_distill({"objective": "distill"}) and not is_distill({"objective": "grpo"}, ("kl", "ce"))
    assert is_distill({}, ("kl", "ce")) and not is_distill({}, ("reward", "kl"))


def test_kl_and_ce_are_charted_by_step_and_by_evaluation_in_the_distillation_tab(qtbot, page):
    state = page.state
    assert not page.chart_tabs.isTabVisible(page.chart_tabs.indexOf(page.distill_charts))
    state.info.config, state.info.name = {"objective": "distill", "distill_teacher": "default"}, "distil-demo"
    state.apply(Started(run_id="run-d", run_dir="/tmp/d", total_steps=6))
    for s in range(1, 5):
        state.apply(_step(s, kl=0.8 / s, ce=3.0 - 0.25 * s))
    state.apply(Eval(step=2, eval_loss=1.1, metrics={"kl": 0.5, "ce": 2.6}))
    state.apply(Eval(step=4, eval_loss=0.9, metrics={"kl": 0.3, "ce": 2.2}))
    tabs, charts = page.chart_tabs, page.distill_charts
    # the Distillation tab comes forward (the Rewards and Rollouts tabs stay hidden); the loss charts stay a click away
    assert tabs.tabBar().isVisible() and tabs.currentWidget() is charts
    assert [tabs.isTabVisible(i) for i in range(tabs.count())] == [True, False, False, True]
    assert tabs.tabText(tabs.indexOf(charts)) == "Distillation"
    # one chart is redrawn per event-loop turn: both, with the newest figures
    qtbot.waitUntil(lambda: all(_points(c, "eval") == 2 for c in (charts.kl, charts.ce)), timeout=5000)
    xs, kl = charts.kl.curves["train"].getOriginalDataset()
    _, ce = charts.ce.curves["train"].getOriginalDataset()
    assert list(xs) == [1, 2, 3, 4] and list(kl) == pytest.approx([0.8, 0.4, 0.8 / 3, 0.2])
    assert list(ce) == [2.75, 2.5, 2.25, 2.0]
    ex, ekl = charts.kl.curves["eval"].getOriginalDataset()
    _, ece = charts.ce.curves["eval"].getOriginalDataset()
    assert list(ex) == [2, 4] and list(ekl) == [0.5, 0.3] and list(ece) == [2.6, 2.2]
    assert not charts.kl.isHidden() and charts.kl.title.startswith("Divergence to the teacher")
    page._show_progress()
    assert page.progress.format().endswith("KL 0.2 · CE 2")
    # a person's choice of tab stays while the run goes on
    tabs.setCurrentIndex(0)
    state.apply(_step(5, kl=0.1, ce=1.9))
    assert tabs.currentIndex() == 0
    assert not page.speed_label.isVisible()  # timed only at the end
    state.apply(_step(6, kl=0.1, ce=1.9))  # the last step: the engine now times both models
    page._show_progress()
    assert page.progress.format().endswith("timing the student's generation against the teacher's…")
    state.apply(SPEED)
    assert "timing" not in page.progress.format() and page.speed_label.text() == SPEED_LINE


def test_a_grpo_run_with_a_kl_figure_has_no_distillation_tab(page):
    state = page.state
    state.info.config = {"objective": "grpo"}
    state.apply(Started(run_id="run-g", run_dir="/tmp/g", total_steps=6))
    state.apply(_step(1, reward=1.0, kl=0.01))
    assert not page.chart_tabs.isTabVisible(page.chart_tabs.indexOf(page.distill_charts))
    assert page.chart_tabs.currentWidget() is page.rl_charts
    page.distill_charts.refresh()  # GRPO's KL is not a divergence to a teacher: nothing drawn there
    assert _points(page.distill_charts.kl, "train") == 0 and _points(page.distill_charts.ce, "eval") == 0


def test_a_live_distillation_shows_its_student_speed_beside_the_teacher_at_its_end(qtbot, window):
    outcome = start_with(
        qtbot,
        window,
        """
        started(total=3)
        for s in (1, 2, 3):
            emit(type="step", step=s, total_steps=3, loss=1.0, lr=1e-4, grad_norm=0.5, tokens_per_s=40.0,
                 memory_used_bytes=1, memory_peak_bytes=1, metrics={"kl": 0.5 / s, "ce": 2.0})
        emit(type="distill_speed", prompts=4, new_tokens=16, teacher_tokens_per_s=420.0,
             teacher_tokens_per_cpu_s=270.0, student_tokens_per_s=812.0, student_tokens_per_cpu_s=540.0,
             teacher_layers=30, student_layers=15, teacher_params=134515008, student_params=71000000)
        emit(type="finished", run_id="fake-run", status="completed", step=3, final_loss=1.0)
    """,
    )
    assert outcome.status == "completed"
    page = window.train_page
    assert window.run_state.distill_speed == SPEED
    assert page.speed_label.isVisible() and page.speed_label.text() == SPEED_LINE
    assert "4 prompts, up to 16 new tokens" in page.speed_label.toolTip()
    assert list(window.run_state.figures.column("kl")) == [0.5, 0.25, 0.5 / 3]
    # a new run clears it
    window.run_state.reset()
    assert not page.speed_label.isVisible()


def _stored_distill(store: Store, name: str, speed: DistillSpeed | None) -> str:
    rid = store.create_run({"model": "m", "objective": "distill", "distill_teacher": "default", "run_name": name})
    for s in (1, 2):
        store.add_metrics(rid, "train", s, {"loss": 1.0, "metrics": {"kl": 0.4 / s, "ce": 2.0 / s}})
    store.add_metrics(rid, "eval", 2, {"eval_loss": 0.9, "metrics": {"kl": 0.25, "ce": 1.1}})
    if speed is not None:
        store.add_distill_speed(rid, speed)
    store.update_run(rid, status="completed", step=2, total_steps=2)
    return rid


def test_an_opened_distillation_reads_its_figures_and_speed_and_runs_shows_the_speed(qtbot, make_window):
    store = Store()
    timed = _stored_distill(store, "timed", SPEED)
    untimed = _stored_distill(store, "untimed", None)
    sft = store.create_run({"model": "m", "objective": "sft", "run_name": "plain"})
    store.update_run(sft, status="completed")
    win = make_window({})
    win.show()
    assert win.controller.open_run(timed)
    state, page = win.run_state, win.train_page
    assert list(state.figures.column("ce")) == [2.0, 1.0] and list(state.eval_figures.column("kl")) == [0.25]
    assert state.distill_speed == SPEED
    win.tabs.setCurrentWidget(page)
    assert page.chart_tabs.currentWidget() is page.distill_charts and page.speed_label.text() == SPEED_LINE
    assert win.controller.open_run(untimed)
    assert state.distill_speed is None and not page.speed_label.isVisible()

    runs = win.runs_page
    win.tabs.setCurrentWidget(runs)
    runs.refresh()
    for rid, line in ((timed, SPEED_LINE), (untimed, None), (sft, None), (timed, SPEED_LINE)):
        runs.select_ids([rid])
        assert runs.speed_label.isVisible() == (line is not None), rid
        if line is not None:
            assert runs.speed_label.text() == line
    runs.select_ids([timed, untimed])  # two runs: no one run's detail
    assert not runs.speed_label.isVisible()
