"""Set up's GRPO rewards editor and the reward workbench, through their widgets: GRPO shows the editor and its
settings, rewards are added, edited and removed with core.rewards' messages beside them and Start held back; the
workbench samples the tiny model in the real generation worker, scores the answers (a Python reward in its sandbox
reads the dataset's columns) off the UI thread, shows scores, totals, spread, best and worst, and a failing reward
is a message, never a traceback."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from PySide6.QtCore import Qt, QTimer

from finetune_studio.core.protocol import generation as gp
from finetune_studio.studio.pages.setup_page import SetupPage
from finetune_studio.studio.services.generation_worker import AdapterSpec, GenerationWorker
from finetune_studio.studio.state import rewards as rw
from finetune_studio.studio.state.run import MemoryState
from finetune_studio.studio.state.setup import SetupState

# the offscreen platform's notes on the workbench window being shown and raised, not the app's warnings
pytestmark = pytest.mark.qt_log_ignore(
    "This plugin does not support propagateSizeHints", "This plugin does not support raise"
)


def _page(qtbot, config: dict) -> SetupPage:
    page = SetupPage(SetupState(config), MemoryState())
    qtbot.addWidget(page)
    page.resize(1100, 800)
    page.show()
    return page


def _shut(qtbot, page: SetupPage) -> None:
    page.shutdown()
    worker = page._own_worker
    if worker is not None:
        qtbot.waitUntil(lambda: not worker.running, timeout=20_000)


def test_grpo_shows_its_rewards_and_settings_and_each_reward_is_edited_in_place(qtbot, tmp_path):
    page = _page(qtbot, {"dataset": str(tmp_path / "d.jsonl")})
    try:
        editor = page.rewards_editor
        assert not editor.isVisible()
        assert not page.advanced_form.editors["grpo_group_size"].isVisibleTo(page)
        qtbot.mouseClick(page.objective.buttons["grpo"], Qt.MouseButton.LeftButton)
        assert editor.isVisible() and page.objective_about.text().startswith("GRPO trains the model online")
        assert page.advanced_form.editors["grpo_group_size"].isVisibleTo(page.advanced_form)
        assert not page.start_button.isEnabled() and "add at least one reward" in editor.whole_error.text()
        assert "rewards" in page.blockers.text()

        editor.kind_box.setCurrentIndex(editor.kind_box.findData("json_valid"))
        qtbot.mouseClick(editor.add_button, Qt.MouseButton.LeftButton)
        editor.kind_box.setCurrentIndex(editor.kind_box.findData("length"))
        assert editor.kind_about.text() == rw.KINDS["length"].sentence
        qtbot.mouseClick(editor.add_button, Qt.MouseButton.LeftButton)
        assert [b.kind for b in editor.boxes] == ["json_valid", "length"]
        length = editor.boxes[1]
        # the new reward's first field takes the keyboard
        assert page.window().focusWidget() is length.fields["min_tokens"]
        # a length needs a bound: core.rewards' message beside it, Start held back
        assert length.error.text().startswith("Reward 2 (length): length needs at least one bound")
        assert not page.start_button.isEnabled()
        qtbot.keyClicks(length.fields["max_tokens"], "40")
        length.weight.selectAll()
        qtbot.keyClicks(length.weight, "0.5")
        assert length.error.isHidden() and page.start_button.isEnabled()
        assert page.state.config.rewards[1] == {"kind": "length", "weight": 0.5, "max_tokens": 40, "soft": True}
        assert editor.boxes[1] is length  # typing never rebuilt the boxes (the cursor stays)

        qtbot.keyClicks(editor.boxes[0].weight, "x")  # "1x"
        assert editor.boxes[0].error.text() == "Reward 1 (json_valid): the weight must be a number, not '1x'"
        assert not page.start_button.isEnabled()
        qtbot.mouseClick(editor.boxes[0].remove, Qt.MouseButton.LeftButton)
        assert [b.kind for b in editor.boxes] == ["length"] and page.start_button.isEnabled()
        assert editor.boxes[0].title.text() == "1. Length window"

        qtbot.mouseClick(page.objective.buttons["sft"], Qt.MouseButton.LeftButton)
        assert not editor.isVisible() and page.state.config.rewards == []
        assert not page.advanced_form.editors["grpo_group_size"].isVisibleTo(page.advanced_form)
    finally:
        _shut(qtbot, page)


def _rewards_file(tmp_path, body: str) -> str:
    path = tmp_path / f"reward_{abs(hash(body))}.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return str(path)


def test_workbench_samples_the_model_and_scores_off_the_ui_thread(qtbot, tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Name a colour.", "answer": "red"}, {"prompt": "Say hello.", "answer": "hello!"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    # reads the dataset's column through the sandbox, and sleeps so that scoring takes a while
    slow = _rewards_file(
        tmp_path,
        """
        import time
        def reward(prompts, completions, answer, **kwargs):
            time.sleep(1.0)
            return [float(len(a)) for a in answer]
        """,
    )
    rewards = [
        {"kind": "json_valid"},
        {"kind": "length", "max_chars": 12, "weight": 0.5},
        {"kind": "python", "path": slow, "name": "column"},
    ]
    page = _page(qtbot, {"model": str(tiny_model_dir), "dataset": str(data), "objective": "grpo", "rewards": rewards})
    try:
        assert page.state.ready, page.state.errors
        boxes = page.rewards_editor.boxes  # a config's rewards (a past run's, a preset's) each in its box, shown
        assert [b.kind for b in boxes] == ["json_valid", "length", "python"] and all(b.isVisible() for b in boxes)
        assert boxes[2].fields["name"].text() == "column" and boxes[1].fields["max_chars"].text() == "12"
        page.open_workbench()
        bench = page.workbench
        assert bench is not None and bench.isVisible()
        bench.prompts_spin.setValue(2)
        bench.answers_spin.setValue(3)
        bench.tokens_spin.setValue(12)
        ticks = []
        timer = QTimer(interval=50)
        timer.timeout.connect(lambda: ticks.append(bench.state.status) if bench.state.busy else None)
        timer.start()
        qtbot.mouseClick(bench.sample_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: bench.state.result is not None or bool(bench.state.error), timeout=180_000)
        timer.stop()
        assert bench.state.error == "" and bench.error.isHidden()
        # the event loop kept turning while the sandboxed reward slept (scoring ran on another thread)
        assert sum(1 for s in ticks if s.startswith("Scoring")) >= 5, ticks[-5:]
        result = bench.state.result
        assert result.count == 6 and result.names == ["json_valid", "length", "column"]
        assert result.scores["column"] == [3.0] * 3 + [6.0] * 3  # each prompt's own "answer" column
        assert bench.status.text() == "Scored 6 answers to 2 prompts."

        table = bench.table
        headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
        assert headers == ["Prompt", "Answer", "json_valid", "length", "column", "Total", ""]
        assert table.rowCount() == 6 and table.item(0, 0).text() == "Name a colour." and table.item(1, 0).text() == ""
        totals = result.totals()
        for row in range(6):
            assert table.item(row, 1).text() == " ".join(result.answers[row // 3][row % 3].split())[:160]
            assert float(table.item(row, 5).text()) == float(f"{totals[row]:.3g}")
        marks = {row: table.item(row, 6).text() for row in range(6) if table.item(row, 6).text()}
        expected = {}
        for best, worst in result.best_and_worst().values():
            expected[best], expected[worst] = "best", "worst"
        assert marks == expected
        for row in marks:
            assert table.item(row, 1).background().color().alpha() > 0
        stats = [bench.stats.item(r, 0).text() for r in range(bench.stats.rowCount())]
        assert stats == ["json_valid", "length", "column", "total"]
        column_stats = result.stats()[2]
        assert bench.stats.item(2, 4).text() == "3 – 6" and column_stats.flat_prompts == 2
        assert bench.stats.item(2, 5).text() == "2 of 2"

        # a reward that fails: its message in the dialog, in words, no traceback
        broken = _rewards_file(
            tmp_path,
            """
            def reward(prompts, completions, **kwargs):
                raise ValueError("the answers need a 'city' field")
            """,
        )
        page.state.set("rewards", rw.form_rows([{"kind": "json_valid"}, {"kind": "python", "path": broken}]))
        qtbot.mouseClick(bench.sample_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: bench.state.error != "", timeout=120_000)
        text = bench.error.text()
        assert bench.error.isVisible() and "the answers need a 'city' field" in text and "python" in text
        assert "Traceback" not in text and 'File "' not in text
        assert bench.sample_button.isEnabled() and not bench.stop_button.isEnabled()
    finally:
        _shut(qtbot, page)


def test_workbench_says_why_it_cannot_sample(qtbot, tmp_path):
    page = _page(qtbot, {"dataset": "pairs:latest", "objective": "grpo", "rewards": [{"kind": "json_valid"}]})
    try:
        page.open_workbench()
        bench = page.workbench
        qtbot.mouseClick(bench.sample_button, Qt.MouseButton.LeftButton)
        assert "holds pairs, not prompts" in bench.error.text() and bench.error.isVisible()
        assert bench.state.result is None and page._own_worker is not None and not page._own_worker.running
    finally:
        _shut(qtbot, page)


@pytest.mark.parametrize(
    "objective,settings",
    [
        ("grpo", {"grpo_group_size": 6, "grpo_max_new_tokens": 40, "grpo_temperature": 0.7}),
        ("ppo", {"ppo_samples_per_prompt": 3, "ppo_max_new_tokens": 24, "ppo_temperature": 0.9}),
    ],
)
def test_workbench_samples_as_the_chosen_objective_would(qtbot, tmp_path, objective, settings):
    """The workbench starts from the sampling settings of the objective on the form: GRPO's, or PPO's."""
    config = {"dataset": "pairs:latest", "objective": objective, "rewards": [{"kind": "json_valid"}], **settings}
    page = _page(qtbot, config)
    try:
        page.open_workbench()
        bench = page.workbench
        answers, tokens, temperature = settings.values()
        assert bench.answers_spin.value() == answers and bench.tokens_spin.value() == tokens
        assert bench.temperature.value() == pytest.approx(temperature)
    finally:
        _shut(qtbot, page)


def test_workbench_scores_a_reward_model_in_the_worker(qtbot, tiny_model_dir, tmp_path):
    """A reward model's scores come from the generation worker's score request: those the model gives the same
    answers when loaded here, and they count in the total with their weight."""
    from reward_helpers import train_reward_model
    from tiny_model import build_adapter_dir

    from finetune_studio.engine.reward_model import RewardModel

    (tmp_path / "reward").mkdir()
    result, _events, _config = train_reward_model(tiny_model_dir, tmp_path / "reward", max_steps=2)
    folder = str(result.adapter_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Say something about foxes."}) + "\n", encoding="utf-8")
    rewards = [{"kind": "json_valid"}, {"kind": "reward_model", "adapter": folder, "weight": 2}]
    start = str(build_adapter_dir(tiny_model_dir, tmp_path / "start", seed=3))  # the run's starting adapter
    config = {"model": str(tiny_model_dir), "dataset": str(data), "objective": "grpo", "rewards": rewards}
    page = _page(qtbot, {**config, "init_adapter": start})
    try:
        assert page.state.ready, page.state.errors
        page.open_workbench()
        bench = page.workbench
        done = []
        bench.worker.reply.connect(lambda r: done.append(r) if isinstance(r, gp.Done) else None)
        bench.answers_spin.setValue(3)
        bench.tokens_spin.setValue(8)
        qtbot.mouseClick(bench.sample_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: bench.state.result is not None or bool(bench.state.error), timeout=180_000)
        assert bench.state.error == "", bench.state.error
        got = bench.state.result
        assert got.unscored == {} and got.names == ["json_valid", "reward_model"]
        model = RewardModel.load(folder)
        answers = got.answers[0]
        expected = model.score(["Say something about foxes."] * len(answers), answers)
        assert got.scores["reward_model"] == [pytest.approx(v, abs=1e-4) for v in expected]
        assert got.totals() == pytest.approx([j + 2 * r for j, r in zip(got.scores["json_valid"], expected)], abs=2e-4)
        headers = [bench.table.horizontalHeaderItem(c).text() for c in range(bench.table.columnCount())]
        assert headers[2:4] == ["json_valid", "reward_model"]
        # sampled from the model the run starts from: the base with the starting adapter attached
        assert bench.worker.adapters == {"workbench": AdapterSpec(start, None)}
        assert [d.adapter for d in done] == ["workbench"] * 3
        assert [d.text for d in sorted(done, key=lambda d: d.candidate)] == answers  # they end in any order
        assert "with the adapter" in bench.about.text()
    finally:
        _shut(qtbot, page)


# A generation worker from before the score request: it loads, answers generate_batch with fixed answers (a JSON
# object, then plain words) and refuses what it does not know, as the real one refuses an unknown request type.
OLD_WORKER = textwrap.dedent("""
    import json, sys
    def say(**kw):
        sys.stdout.write(json.dumps({"v": 1, **kw}) + "\\n"); sys.stdout.flush()
    say(type="ready", id="", pid=1)
    for line in sys.stdin:
        req = json.loads(line)
        kind, rid = req["type"], req["id"]
        if kind == "load":
            say(type="loaded", id=rid, model=req["model"])
        elif kind == "generate_batch":
            for p, item in enumerate(req["prompts"]):
                for c in range(item["n"]):
                    text = '{"answer": %d}' % c if c % 2 == 0 else "no json here"
                    say(type="done", id=rid, prompt=p, candidate=c, text=text, tokens=3 + c)
            say(type="generated", id=rid, prompts=len(req["prompts"]))
        else:
            say(type="error", id=rid, kind="bad_request", message=f"unknown request type {kind!r}")
""")


def test_a_worker_that_cannot_score_leaves_the_reward_model_to_training(qtbot, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "One?"}\n{"prompt": "Two?"}\n', encoding="utf-8")
    rewards = [{"kind": "json_valid"}, {"kind": "reward_model", "adapter": str(tmp_path / "rm")}]
    page = _page(qtbot, {"dataset": str(data), "objective": "grpo", "rewards": rewards})
    try:
        page._own_worker = GenerationWorker(page)
        page._own_worker.argv = [sys.executable, "-c", OLD_WORKER]
        page.open_workbench()
        bench = page.workbench
        bench.answers_spin.setValue(2)
        qtbot.mouseClick(bench.sample_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: bench.state.result is not None or bool(bench.state.error), timeout=30_000)
        result = bench.state.result
        assert bench.state.error == "" and result.scores == {"json_valid": [1.0, 0.0, 1.0, 0.0]}
        assert result.unscored["reward_model"].startswith("scored during training")
        assert bench.status.text() == "Scored 4 answers to 2 prompts; reward_model scored during training only."
        assert bench.note.isVisible() and bench.note.text().startswith("reward_model: scored during training")
        table = bench.table
        headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
        assert headers == ["Prompt", "Answer", "json_valid", "Total", ""]
        assert [table.item(r, 4).text() for r in range(4)] == ["best", "worst", "best", "worst"]
    finally:
        _shut(qtbot, page)


def test_the_window_lends_the_workbench_its_one_generation_worker(make_window, tmp_path):
    win = make_window({"dataset": str(tmp_path / "d.jsonl"), "objective": "grpo", "rewards": [{"kind": "json_valid"}]})
    win.setup_page.open_workbench()
    assert win.setup_page.workbench.worker is win.generation_worker  # one model in memory for every page
    assert win.setup_page._own_worker is None
