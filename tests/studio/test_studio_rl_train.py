"""The Train page of an online RL run and of a reward model: the reward charts from the steps' figures, the rollouts
table (sorted by a header click, rows chosen by mouse, the answer in full), and Send to Annotate through the main
window into Annotate's queue."""

from __future__ import annotations

import math

import pytest
from PySide6.QtCore import QPoint, Qt
from studio_support import IGNORE_OFFSCREEN
from tests_rl_support import rollouts_event

from finetune_studio.core.protocol.events import Eval, Started, Step
from finetune_studio.studio.state.run import MemoryState, RunState

pytestmark = IGNORE_OFFSCREEN


def _step(step: int, **metrics: float) -> Step:
    return Step(
        step=step,
        total_steps=20,
        loss=0.2,
        lr=1e-5,
        grad_norm=0.5,
        tokens_per_s=50.0,
        memory_used_bytes=1 << 20,
        memory_peak_bytes=1 << 20,
        metrics=metrics,
    )


def _items(step: int, prompt: str, rewards: list[float], group: int = 0) -> list[dict]:
    return [
        {
            "prompt": prompt,
            "completion": f'{{"name": "Ann", "age": {30 + i}}} at step {step} #{i}',
            "reward": r,
            "rewards": {"json_valid": 1.0, "exact_match": r - 1.0},
            "advantage": r - 1.5,
            "group": group,
        }
        for i, r in enumerate(rewards)
    ]


def _grpo(state: RunState, steps: int = 3, objective: str = "grpo") -> None:
    state.info.config = {"objective": objective, "model": "tiny", f"{objective}_temperature": 0.9}
    state.info.name = "grpo-demo"
    state.apply(Started(run_id="run-grpo", run_dir="/tmp/r", total_steps=20))
    for s in range(1, steps + 1):
        state.apply(
            _step(
                s,
                reward=1.0 + 0.2 * s,
                reward_std=0.3,
                kl=0.01 * s,
                completion_length=20.0 - s,
                clip_fraction=0.1 / s,
                **{"reward/json_valid": 1.0, "reward/exact_match": 0.2 * s},
            )
        )
        state.apply(rollouts_event(s, _items(s, "Ann is 31. JSON?", [1.0, 2.0, 1.5, 0.5])))


@pytest.fixture
def page(qtbot):
    from finetune_studio.studio.pages.train_page import TrainPage

    state = RunState()
    page = TrainPage(state, MemoryState())
    qtbot.addWidget(page)
    page.resize(1000, 700)
    page.show()
    qtbot.waitExposed(page)
    return page


def _click_row(qtbot, table, row: int, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    rect = table.visualRect(table.model().index(row, 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, modifier, rect.center())


def _click_header(qtbot, table, column: int) -> None:
    header = table.horizontalHeader()
    x = header.sectionViewportPosition(column) + header.sectionSize(column) // 2
    qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, header.height() // 2))


def test_sft_run_shows_its_loss_charts_alone(page):
    page.state.info.config = {"objective": "sft"}
    page.state.apply(Started(run_id="r", run_dir="/tmp/r", total_steps=5))
    page.state.apply(_step(1))
    assert page.chart_tabs.tabBar().isHidden() and page.chart_tabs.currentWidget() is page.charts


def test_grpo_figures_are_charted_live_and_the_rewards_tab_comes_forward(qtbot, page):
    _grpo(page.state)
    tabs = page.chart_tabs
    assert tabs.tabBar().isVisible() and tabs.currentWidget() is page.rl_charts
    charts = page.rl_charts
    qtbot.waitUntil(lambda: charts.redraws >= 4, timeout=5000)
    charts.refresh()
    xs, ys = charts.reward.curves["reward"].getOriginalDataset()
    assert list(xs) == [1, 2, 3] and [round(y, 6) for y in ys] == [1.2, 1.4, 1.6]
    _, hi = charts.reward.curves["band_hi"].getOriginalDataset()
    assert round(float(hi[0]), 6) == 1.5  # mean + one standard deviation
    assert set(charts.reward.curves) >= {"reward/json_valid", "reward/exact_match"}  # one curve per function
    _, kl = charts.kl.curves["kl"].getOriginalDataset()
    _, length = charts.length.curves["completion_length"].getOriginalDataset()
    _, clip = charts.clip.curves["clip_fraction"].getOriginalDataset()
    assert [round(v, 6) for v in kl] == [0.01, 0.02, 0.03] and list(length) == [19, 18, 17]
    assert math.isclose(clip[2], 0.1 / 3)
    assert charts.reward_model.isHidden()
    tabs.setCurrentIndex(0)  # a person's choice of tab stays as the run goes on
    page.state.apply(_step(4, reward=2.0))
    assert tabs.currentIndex() == 0


def test_reward_model_run_charts_held_out_accuracy_and_gap(qtbot, page):
    page.state.info.config = {"objective": "reward"}
    page.state.apply(Started(run_id="rm", run_dir="/tmp/rm", total_steps=20))
    page.state.apply(Eval(step=10, eval_loss=0.5, metrics={"accuracy": 0.8, "gap": 0.9}))
    page.state.apply(Eval(step=20, eval_loss=0.4, metrics={"accuracy": 0.97, "gap": 2.5}))
    charts = page.rl_charts
    charts.refresh()
    assert page.chart_tabs.currentWidget() is charts and not charts.reward_model.isHidden()
    assert charts.reward.isHidden()  # no GRPO figures
    xs, acc = charts.reward_model.curves["accuracy"].getOriginalDataset()
    _, gap = charts.reward_model.curves["gap"].getOriginalDataset()
    assert list(xs) == [10, 20] and list(acc) == [0.8, 0.97] and list(gap) == [0.9, 2.5]


def test_rollouts_table_sorts_grows_and_shows_the_chosen_answer(qtbot, page):
    _grpo(page.state, steps=2)
    view = page.rollouts_view
    page.chart_tabs.setCurrentWidget(view)
    table, model = view.table, view.model
    assert model.headers()[:4] == ["Step", "Group", "Reward", "Adv."]
    assert model.headers()[4:6] == ["json_valid", "exact_match"] and model.rowCount() == 4
    assert [r.reward for r in model.rows] == [2.0, 1.5, 1.0, 0.5]  # the latest step, best first
    assert {r.step for r in model.rows} == {2}
    _click_header(qtbot, table, 2)  # Reward again: ascending
    assert [r.reward for r in model.rows] == [0.5, 1.0, 1.5, 2.0]
    _click_header(qtbot, table, 5)  # a reward function's score
    assert model.sort_key == "reward/exact_match"

    _click_row(qtbot, table, 0)
    first = view.selected()
    assert len(first) == 1 and first[0].completion in view.detail.toPlainText()
    assert "Prompt:\nAnn is 31. JSON?" in view.detail.toPlainText() and view.send_button.isEnabled()
    _click_row(qtbot, table, 2, Qt.KeyboardModifier.ControlModifier)
    assert len(view.selected()) == 2

    # a new step arrives while rows are selected: the view holds their step, the summary says so
    page.state.apply(rollouts_event(3, _items(3, "Ann is 31. JSON?", [0.0, 3.0])))
    assert {r.step for r in model.rows} == {2} and len(view.selected()) == 2
    assert "held while rows are selected" in view.summary.text()
    with qtbot.waitSignal(page.annotate_requested) as sent:
        qtbot.mouseClick(view.send_button, Qt.MouseButton.LeftButton)
    chosen, group = sent.args
    assert len(chosen) == 2 and {r.step for r in chosen} == {2} and len(group) == 4
    table.setFocus()
    qtbot.keyClick(table, Qt.Key.Key_Escape)  # Esc: nothing selected, the view follows the run again
    assert view.selected() == []
    assert {r.step for r in model.rows} == {3} and model.rowCount() == 2
    view.scope.setCurrentIndex(1)  # every step
    assert model.rowCount() == 10


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_send_to_annotate_opens_the_rollouts_in_annotate(qtbot, make_window, objective):
    """A GRPO or PPO run's rollouts go to Annotate with the temperature they were sampled at."""
    from finetune_studio.studio.main_window import ANNOTATE

    win = make_window({})
    win.show()
    _grpo(win.run_state, steps=1, objective=objective)
    assert win.train_page.rl_charts.has_grpo  # the online RL charts, for either objective
    view = win.train_page.rollouts_view
    win.train_page.chart_tabs.setCurrentWidget(view)
    _click_row(qtbot, view.table, 1)  # reward 1.5: paired with the group's most different answer (0.5)
    qtbot.mouseClick(view.send_button, Qt.MouseButton.LeftButton)
    assert win.tabs.currentIndex() == ANNOTATE
    annotate = win.annotate_page
    assert annotate.spec is not None and annotate.spec.name == "rollouts of grpo-demo"
    assert len(annotate.state.items) == 1
    prefs = win.controller.store.preferences
    item = annotate.state.item
    texts = {prefs.candidate(c)["text"] for c in (item.a, item.b)}
    assert texts == {r.completion for r in win.run_state.rollouts.rows if r.reward in (1.5, 0.5)}
    assert {prefs.candidate(c)["sampling"] for c in (item.a, item.b)} == {'{"temperature": 0.9}'}  # how it was drawn
    assert annotate.spec.sampling.temperature == 0.9
    assert "Sent 2 answers to Annotate (paired with" in win.statusBar().currentMessage()

    # two prompts at once cannot be one pair: the page says what to do, nothing is sent
    win.tabs.setCurrentIndex(1)
    win.run_state.apply(rollouts_event(2, _items(2, "Bob is 40. JSON?", [1.0, 0.0], group=1)))
    view.scope.setCurrentIndex(1)
    rows = view.model.rows
    _click_row(qtbot, view.table, next(i for i, r in enumerate(rows) if r.prompt.startswith("Ann")))
    _click_row(
        qtbot,
        view.table,
        next(i for i, r in enumerate(rows) if r.prompt.startswith("Bob")),
        Qt.KeyboardModifier.ControlModifier,
    )
    qtbot.mouseClick(view.send_button, Qt.MouseButton.LeftButton)
    assert win.tabs.currentIndex() == 1 and "2 different prompts" in view.message.text()
    assert prefs.stats()["candidates"] == 2


def test_a_live_grpo_run_fills_the_charts_and_the_rollouts_from_the_engines_events(qtbot, window):
    from studio_support import start_with

    outcome = start_with(
        qtbot,
        window,
        """
        started(total=3)
        for s in (1, 2, 3):
            emit(type="step", step=s, total_steps=3, loss=0.1, lr=1e-5, grad_norm=0.5, tokens_per_s=40.0,
                 memory_used_bytes=1, memory_peak_bytes=1,
                 metrics={"reward": 0.5 * s, "reward_std": 0.1, "reward/json_valid": 1.0, "kl": 0.01 * s,
                          "completion_length": 10.0, "clip_fraction": 0.0})
            emit(type="rollouts", step=s, items=[
                {"prompt": "P", "completion": f"answer {s}.{i}", "reward": float(i), "rewards": {"json_valid": 1.0},
                 "advantage": i - 0.5, "group": 0} for i in range(2)])
            if s == 2:
                emit(type="eval", step=2, eval_loss=0.3, metrics={"eval_reward": 0.75, "eval_reward/json_valid": 0.75})
        emit(type="finished", run_id="fake-run", status="completed", step=3, final_loss=0.1)
    """,
    )
    assert outcome.status == "completed"
    state, page = window.run_state, window.train_page
    assert list(state.figures.column("reward")) == [0.5, 1.0, 1.5] and state.figures.reward_functions() == [
        "json_valid"
    ]
    assert len(state.rollouts) == 6 and state.rollouts.last_step == 3
    assert page.chart_tabs.currentWidget() is page.rl_charts and page.chart_tabs.isTabVisible(2)
    assert [r.completion for r in page.rollouts_view.model.rows] == ["answer 3.1", "answer 3.0"]
    page._show_progress()
    assert "mean reward 1.5" in page.progress.format() and "loss" not in page.progress.format()
    # the evaluation's held-out reward (greedy answers) is drawn on the reward chart at its step
    held_out = page.rl_charts.reward.curves["eval_reward"]
    qtbot.waitUntil(lambda: held_out.getData()[0] is not None and len(held_out.getData()[0]) == 1, timeout=5000)
    assert list(held_out.getData()[0]) == [2] and list(held_out.getData()[1]) == [0.75]


def test_an_opened_run_reads_its_figures_and_rollouts_from_the_database(qtbot, make_window):
    from finetune_studio.core.store import Store

    store = Store()
    rid = store.create_run({"model": "m", "objective": "grpo", "run_name": "stored-grpo", "max_steps": 2})
    for s in (1, 2):
        store.add_metrics(rid, "train", s, {"loss": 0.1, "metrics": {"reward": 0.25 * s, "kl": 0.1}})
        store.add_rollouts(rid, s, _items(s, "Stored prompt", [0.5, 1.0, 0.0]))
    store.add_metrics(rid, "eval", 2, {"eval_loss": 0.3, "metrics": {"accuracy": 0.5}})
    store.update_run(rid, status="completed", step=2)
    win = make_window({})
    assert win.controller.open_run(rid)
    state = win.run_state
    assert list(state.figures.column("reward")) == [0.25, 0.5] and list(state.eval_figures.column("accuracy")) == [0.5]
    assert [(r.step, r.index) for r in state.rollouts.rows] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert state.rollouts.rows[4].rewards == {"json_valid": 1.0, "exact_match": 0.0}
    view = win.train_page.rollouts_view
    assert [r.reward for r in view.model.rows] == [1.0, 0.5, 0.0]
    # polled again (a followed run): nothing is read twice
    win.controller._load_history(rid)
    assert len(state.rollouts) == 6 and state.figures.n == 2


def test_reward_objectives_own_evaluations_chart_as_accuracy_and_gap(qtbot, page):
    """The reward objective reports its held-out figures in the evaluations' reward_accuracy / reward_margin."""
    page.state.info.config = {"objective": "reward"}
    page.state.apply(Started(run_id="rm2", run_dir="/tmp/rm2", total_steps=8))
    for step, acc, gap in ((4, 0.6, 0.2), (8, 0.96, 1.4)):
        page.state.apply(Eval(step=step, eval_loss=0.4, reward_margin=gap, reward_accuracy=acc))
    charts = page.rl_charts
    charts.refresh()
    assert page.chart_tabs.isTabVisible(1) and not page.chart_tabs.isTabVisible(2)  # no rollouts for a reward model
    xs, acc = charts.reward_model.curves["accuracy"].getOriginalDataset()
    _, gap = charts.reward_model.curves["gap"].getOriginalDataset()
    assert list(xs) == [4, 8] and list(acc) == [0.6, 0.96] and list(gap) == [0.2, 1.4]


def test_a_followed_grpo_run_grows_its_figures_and_rollouts_at_each_poll(qtbot, make_window):
    """A run training in the background (the app closed and reopened): each poll of the database adds the new steps'
    figures and rollouts."""
    import subprocess

    from finetune_studio.core.store import Store, process_start

    engine = subprocess.Popen(["sleep", "60"])  # stands in for the engine's process: alive, never signalled here
    try:
        store = Store()
        rid = store.create_run({"model": "m", "objective": "grpo", "run_name": "followed", "max_steps": 9})
        store.update_run(rid, status="running", pid=engine.pid, pid_start=process_start(engine.pid))
        store.add_metrics(rid, "train", 1, {"loss": 0.1, "metrics": {"reward": 0.5}})
        store.add_rollouts(rid, 1, _items(1, "P", [0.5, 1.0]))
        win = make_window({})
        assert win.controller.open_run(rid) and win.controller.follow_timer.isActive()
        state = win.run_state
        assert len(state.rollouts) == 2 and state.figures.n == 1
        store.add_metrics(rid, "train", 2, {"loss": 0.1, "metrics": {"reward": 0.75}})
        store.add_rollouts(rid, 2, _items(2, "P", [0.0, 2.0, 1.0]))
        win.controller.poll()
        assert list(state.figures.column("reward")) == [0.5, 0.75] and len(state.rollouts) == 5
        assert [r.reward for r in win.train_page.rollouts_view.model.rows] == [2.0, 1.0, 0.0]  # the newest step
        win.controller.follow_timer.stop()
    finally:
        engine.kill()
        engine.wait(10)
