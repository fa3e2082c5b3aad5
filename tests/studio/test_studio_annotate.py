"""The annotate page driven by keyboard, with the tiny model generating through the real worker subprocess: label,
tie, skip, both bad, edit, undo, export through ``engine pairs export``; a killed worker; the store reopened."""

from __future__ import annotations

import json
import os
import signal

import pytest
from PySide6.QtCore import QProcess, Qt

from finetune_studio.core.store import Store
from finetune_studio.studio.state import annotation as an

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")
PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "What is rain?", "Write a short poem."]


@pytest.fixture
def make_page(qtbot):
    from finetune_studio.studio.pages.annotate.page import AnnotatePage

    pages, stores = [], []

    def make(model: str):
        store = Store()
        page = AnnotatePage(lambda: store, lambda: model)
        page.show()  # not qtbot.addWidget: pytest-qt would delete it before the worker is stopped
        page.refresh()
        pages.append(page)
        stores.append(store)
        return page

    yield make
    for page in pages:
        page.shutdown()
        qtbot.waitUntil(
            lambda page=page: all(p.state() == QProcess.ProcessState.NotRunning for p in page.findChildren(QProcess)),
            timeout=20_000,
        )
        page.close()
        page.deleteLater()
    for store in stores:
        store.close()


def _set_up(page, prompts, max_new_tokens=10):
    page.form.session_name.setText("s1")
    page.form.prompts.setPlainText("\n".join(prompts))
    page.form.temperature.setValue(1.0)
    page.form.max_new_tokens.setValue(max_new_tokens)
    page.form.annotator.setText("ann")


def _key(qtbot, page, key, mods=Qt.KeyboardModifier.NoModifier):
    qtbot.keyClick(page.label_view, key, mods)


def _texts(page, item):
    prefs = page.store.preferences
    return prefs.candidate(item.left)["text"], prefs.candidate(item.right)["text"]


def test_label_by_keyboard_then_export_exactly_those_pairs(qtbot, make_page, tiny_model_dir, tmp_path):
    page = make_page(str(tiny_model_dir))
    _set_up(page, PROMPTS)
    streamed = []
    page.generator.streaming.connect(lambda head, text: streamed.append(head))
    with qtbot.waitSignal(page.generator.finished, timeout=120_000) as done:
        qtbot.mouseClick(page.form.generate_button, Qt.MouseButton.LeftButton)
    assert done.args == [""], page.form.status.text()
    assert streamed and streamed[0].startswith("Prompt 1/5, model 1")
    items = page.spec.items
    assert len(items) == 5 and page.form.gen_progress.value() == page.form.gen_progress.maximum() == 10
    assert (
        page.index == 0
        and page.label_view.answers[0].toPlainText().splitlines() == _texts(page, items[0])[0].splitlines()
    )
    assert "tokens" in page.label_view.heads[0].text()

    _key(qtbot, page, Qt.Key.Key_3)
    _key(qtbot, page, Qt.Key.Key_A)  # item 0: left better, strength 3
    _key(qtbot, page, Qt.Key.Key_T)  # item 1: tie
    _key(qtbot, page, Qt.Key.Key_S)  # item 2: skip
    _key(qtbot, page, Qt.Key.Key_B)  # item 3: right better ...
    assert page.index == 4
    _key(qtbot, page, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # ... undone
    assert page.index == 3 and page.labeller.state(items[3]).decision == ""
    _key(qtbot, page, Qt.Key.Key_X)  # item 3: both bad
    assert page.index == 4
    _key(qtbot, page, Qt.Key.Key_E)  # item 4: edit the left answer
    box = page.label_view.edit_box
    assert box.isVisible() and box.toPlainText().splitlines() == _texts(page, items[4])[0].splitlines()
    qtbot.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)  # unchanged: refused
    assert "identical" in page.form.status.text() and page.editing == "left"
    box.setPlainText("A colour: blue.")
    qtbot.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert not box.isVisible() and page.labeller.state(items[4]) == an.ItemState(
        "edit", None, page.labeller.state(items[4]).comparison_id, "A colour: blue."
    )
    assert page.progress_label.text().startswith(
        "5 done, all labelled · 1 tie · 1 both bad · 1 skip · 1 edit · left picks 100%"
    )
    assert "1 tie, 1 both bad, 1 skip." in page.policy.text() and page.policy.text().startswith("2 DPO pairs")
    assert page.label_view.position.text() == "Pair 5 of 5 · all 5 pairs labelled"

    out = tmp_path / "out"
    page.choose_export_dir = lambda: str(out)
    page.export_format.setCurrentText("trl")
    qtbot.mouseClick(page.export_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not page._pairs_job.running, timeout=60_000)
    assert page.last_snapshot, page.form.status.text()
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    left0, right0 = _texts(page, items[0])
    left4, _ = _texts(page, items[4])
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == sorted(
        [(PROMPTS[0], left0, right0), (PROMPTS[4], "A colour: blue.", left4)]
    )
    manifest = json.loads((out / "snapshot.json").read_text())
    assert manifest["left_out"] == {"tie": 1, "skip": 1, "both_bad": 1}
    assert page.last_snapshot in page.form.status.text()

    # Another process's view of the database: a new Store sees every decision, and a reopened session agrees.
    other = Store()
    try:
        stats = other.preferences.stats()
        decisions = stats["decisions"]
        assert (decisions["a"] + decisions["b"], stats["pairs"], stats["edits"]) == (2, 2, 1)
        assert (decisions["tie"], decisions["both_bad"], decisions["skip"]) == (1, 1, 1)
        strength = other.preferences.comparison(page.labeller.state(items[0]).comparison_id)["strength"]
        assert strength == 1.0
    finally:
        other.close()
    again = make_page(str(tiny_model_dir))
    again.open_session("s1")
    assert [again.labeller.state(i).decision for i in again.spec.items] == ["left", "tie", "skip", "both_bad", "edit"]
    assert again.progress_label.text() == page.progress_label.text()


def test_reopened_session_continues_at_the_first_open_item(qtbot, make_page):
    # The candidates are written directly (no worker): reopening reads the session file and the store only.
    store = Store()
    prefs = store.preferences
    spec = an.SessionSpec("s1", PROMPTS[:3], an.Side(seed=1), an.Side(seed=2), annotator="ann")
    for i, prompt in enumerate(spec.prompts):
        pid = prefs.add_prompt(prompt, source=spec.source)
        spec.items.append(
            an.Item(pid, prefs.add_candidate(pid, f"**a{i}** same words"), prefs.add_candidate(pid, f"b{i} same words"))
        )
    spec.save()
    store.close()
    page = make_page("default")
    assert page.spec.name == "s1" and page.index == 0
    left = page.label_view.answers[0]
    assert left.toPlainText() in ("**a0** same words", "b0 same words")
    _key(qtbot, page, Qt.Key.Key_M)  # Markdown
    assert left.toPlainText() in ("a0 same words", "b0 same words")
    _key(qtbot, page, Qt.Key.Key_D)  # word diff: only the first word differs
    assert "background-color:#f4c7c3" in left.toHtml() and left.toPlainText().endswith(" same words")
    _key(qtbot, page, Qt.Key.Key_D)
    assert left.toPlainText() in ("**a0** same words", "b0 same words")
    _key(qtbot, page, Qt.Key.Key_B)
    _key(qtbot, page, Qt.Key.Key_J)  # next without deciding
    _key(qtbot, page, Qt.Key.Key_K)
    assert page.index == 1
    again = make_page("default")  # the app reopened: the latest session opens by itself
    assert again.form.sessions.findText("s1") >= 0 and again.spec.name == "s1"
    assert again.index == 1 and again.labeller.state(again.spec.items[0]).decision == "right"
    assert again.labeller.state(again.spec.items[1]).decision == ""
    assert again.label_view.position.text() == "Pair 2 of 3"
    again.form.annotator.setText("bob")  # a second annotator on the same items
    again.form.annotator.editingFinished.emit()
    assert again.index == 0 and again.labeller.state(again.spec.items[0]).decision == ""
    _key(qtbot, again, Qt.Key.Key_B)
    assert again.progress_label.text().endswith("κ 1.00 with ann (1 item)")
    assert page.labeller.state(page.spec.items[0]).decision == "right"  # ann's decision is untouched


def test_killed_worker_is_reported_and_the_next_request_recovers(qtbot, make_page, tiny_model_dir):
    page = make_page(str(tiny_model_dir))
    _set_up(page, PROMPTS[:3], max_new_tokens=200)
    killed = []

    def kill_once(_head, _text):
        if not killed:
            killed.append(page.worker._proc.processId())
            os.kill(killed[0], signal.SIGKILL)

    page.generator.streaming.connect(kill_once)
    with qtbot.waitSignal(page.generator.finished, timeout=120_000) as first:
        page.generate()
    assert killed and "generation worker" in first.args[0] and "killed" in first.args[0]
    assert "next request starts a new one" in page.form.status.text()
    assert page.form.generate_button.isEnabled() and len(page.spec.items) == 0
    page.generator.streaming.disconnect(kill_once)
    page.form.max_new_tokens.setValue(8)  # no answers yet, so the settings may still change
    with qtbot.waitSignal(page.generator.finished, timeout=120_000) as second:
        qtbot.mouseClick(page.form.generate_button, Qt.MouseButton.LeftButton)
    assert second.args == [""] and len(page.spec.items) == 3
    assert page.worker.pid != killed[0]


def test_adapter_side_and_train_dpo_in_one_click(qtbot, make_window, tiny_model_dir, tmp_path):
    from tiny_model import build_adapter_dir

    from finetune_studio.studio.main_window import ANNOTATE, SETUP

    adapter = str(build_adapter_dir(tiny_model_dir, tmp_path / "adapter", seed=3))
    win = make_window({"model": str(tiny_model_dir)})
    win.show()
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=5000)
    win.setup_page.start_button.setFocus()
    qtbot.keyClick(win.setup_page.start_button, Qt.Key.Key_4, Qt.KeyboardModifier.ControlModifier)
    assert win.tabs.currentIndex() == ANNOTATE
    page = win.annotate_page
    assert page.form.model.text() == str(tiny_model_dir)
    _set_up(page, PROMPTS[:2], max_new_tokens=8)
    page.form.side_b.adapter.setEditText(adapter)
    with qtbot.waitSignal(page.generator.finished, timeout=120_000) as done:
        page.generate()
    assert done.args == [""], page.form.status.text()
    item = page.spec.items[0]
    prefs = page.store.preferences
    assert (prefs.candidate(item.a)["adapter"], prefs.candidate(item.b)["adapter"]) == ("", adapter)
    _key(qtbot, page, Qt.Key.Key_A)
    qtbot.mouseClick(page.train_button, Qt.MouseButton.LeftButton)
    assert win.tabs.currentIndex() == SETUP
    values = win.setup_state.values
    assert (values["objective"], values["dataset"], values["init_adapter"]) == ("dpo", "pairs:latest", adapter)
    assert (values["learning_rate"], values["run_name"]) == ("2e-05", "dpo-from-adapter")


def test_import_and_export_messages_from_the_tab(qtbot, make_page, tmp_path):
    page = make_page("default")
    page.choose_export_dir = lambda: str(tmp_path / "out")
    page.export()
    qtbot.waitUntil(lambda: not page._pairs_job.running, timeout=60_000)
    assert page.form.status.text().startswith("Export failed: the preference store holds no pairs to export")
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.choose_import_file = lambda: str(data)
    page.import_pairs()
    qtbot.waitUntil(lambda: not page._pairs_job.running, timeout=60_000)
    assert page.form.status.text().startswith("Imported 3 pairs from prefs.jsonl"), page.form.status.text()
    assert page.policy.text().startswith("3 DPO pairs in the store.")
    assert [p.chosen[-1]["content"] for p in page.store.preferences.pairs()] == ["good 0", "good 1", "good 2"]


def test_word_diff_marks_only_the_words_that_differ():
    from finetune_studio.studio.pages.annotate.page import word_diff_html

    left, right = word_diff_html("the cat <sat> here", "the dog <sat> here")
    assert left.count("background-color") == right.count("background-color") == 1
    assert ">cat</span>" in left and ">dog</span>" in right and "&lt;sat&gt;" in left


def test_rank_four_answers_gives_six_comparisons_and_undo_takes_them_back(qtbot, make_page):
    store = Store()
    prefs = store.preferences
    spec = an.SessionSpec("r", ["Rank us."], an.Side(seed=1), an.Side(seed=2), pairs_per_prompt=2, annotator="ann")
    pid = prefs.add_prompt("Rank us.", source=spec.source)
    cands = {t: prefs.add_candidate(pid, t) for t in ("w", "x", "y", "z")}
    spec.items += [an.Item(pid, cands["w"], cands["x"]), an.Item(pid, cands["y"], cands["z"])]
    spec.save()
    store.close()
    page = make_page("default")
    shown = page.labeller.candidates_of(page.item)
    _key(qtbot, page, Qt.Key.Key_R)
    box = page.label_view.edit_box
    assert page.editing == "rank" and box.toPlainText().startswith("1: ")
    box.setPlainText(box.toPlainText() + "1 2 3")  # not every number: refused
    qtbot.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert "from 1 to 4 once" in page.form.status.text()
    box.setPlainText(box.toPlainText().rsplit(":", 1)[0] + ": 4 2 1 3")
    qtbot.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    order = [shown[3], shown[1], shown[0], shown[2]]
    texts = [page.store.preferences.candidate(c)["text"] for c in order]
    pairs = {(p.chosen[-1]["content"], p.rejected[-1]["content"]) for p in page.store.preferences.pairs()}
    assert pairs == {(texts[i], texts[j]) for i in range(4) for j in range(i + 1, 4)}
    assert page.progress_label.text().startswith("2 done, all labelled")  # both items decided by the ranking
    _key(qtbot, page, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert page.store.preferences.stats()["comparisons"] == 0
    assert page.progress_label.text().startswith("0 done, 2 remaining")


def test_prompts_are_data_never_re_split_or_reflowed(qtbot, make_page, tmp_path):
    """A dataset's multi-line prompts are kept as they are; a reopened session's prompts are read-only, and Generate
    on it finds every prompt answered (it split each multi-line prompt into several)."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}:\nline two of {i}"}]} for i in range(3)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = make_page("default")
    page.choose_prompts_file = lambda: str(data)
    qtbot.mouseClick(page.form.load_prompts_button, Qt.MouseButton.LeftButton)
    assert page.form.prompt_list() == [f"Question {i}:\nline two of {i}" for i in range(3)]
    assert page.form.prompts.isReadOnly() and page.form.prompts_count.text().startswith("3 prompts from prompts.jsonl")
    assert page.form.status.text() == "3 prompts from prompts.jsonl (answers left out)."
    # A session made from them, answered (written directly: no worker), reopened in a new page.
    store = Store()
    prefs = store.preferences
    spec = page.form.spec()
    for prompt in spec.prompts:
        pid = prefs.add_prompt(prompt, source=spec.source)
        spec.items.append(an.Item(pid, prefs.add_candidate(pid, "one"), prefs.add_candidate(pid, "two")))
    spec.save()
    store.close()
    again = make_page("default")
    assert again.spec.name == spec.name and again.form.prompts.isReadOnly()
    assert again.form.prompts_count.text() == f"3 prompts in session {spec.name!r} (read-only)."
    again.generate()
    assert again.form.status.text() == "Every prompt has its answers."
    assert an.SessionSpec.load(spec.name).prompts == spec.prompts and len(again.spec.items) == 3
    qtbot.mouseClick(again.form.new_prompts_button, Qt.MouseButton.LeftButton)
    assert not again.form.prompts.isReadOnly() and again.form.prompts.toPlainText() == ""


def test_the_weights_choice_shows_its_cost_and_the_worker_decodes_with_it(qtbot, make_page, tiny_model_dir):
    page = make_page(str(tiny_model_dir))
    form = page.form
    form.model.setText("default")
    form.refresh_weights()  # the bundled model: measured options, the default the fastest that keeps the answers
    assert [form.weights.itemData(i) for i in range(form.weights.count())] == ["full", "int8", "int4"]
    assert form.weights_value() == "full" and "10 prompts x 2 answers" in form.weights_detail.text()
    form.model.setText(str(tiny_model_dir))
    form.refresh_weights()
    form.weights.setCurrentIndex(form.weights.findData("int8"))  # a choice stays while the model offers it
    assert "not measured on this model" in form.weights_detail.text()
    _set_up(page, PROMPTS[:2], max_new_tokens=4)
    replies = []
    page.worker.reply.connect(replies.append)
    with qtbot.waitSignal(page.generator.finished, timeout=120_000) as done:
        page.generate()
    assert done.args == [""] and len(page.spec.items) == 2
    assert page.worker.weights == "int8"
    loaded = [r for r in replies if type(r).__name__ == "Loaded"]
    assert loaded and loaded[-1].weights == "int8"
