"""The compare page through the real worker with the tiny model: the base side has adapters truly off, the two
sides stream on the same prompt and seed, and a choice is a comparison in the store."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QProcess, Qt
from tiny_model import build_adapter_dir

from finetune_studio.core.store import Store

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


@pytest.fixture
def page(qtbot, tiny_model_dir):
    from finetune_studio.studio.pages.compare_page import ComparePage
    from finetune_studio.studio.services.generation_worker import GenerationWorker

    store = Store()
    worker = GenerationWorker(threads=1)
    page = ComparePage(lambda: store, worker, lambda: str(tiny_model_dir))
    page.show()
    page.refresh()
    yield page
    worker.shutdown()
    qtbot.waitUntil(lambda: all(p.state() == QProcess.ProcessState.NotRunning for p in worker.findChildren(QProcess)))
    page.close()
    page.deleteLater()
    worker.deleteLater()
    store.close()


def _send(qtbot, page):
    deltas = []
    page.worker.reply.connect(lambda r: deltas.append(r) if r.type == "delta" else None)
    qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not page.busy, timeout=120_000)
    return deltas


def test_base_against_adapter_same_seed_and_a_choice_in_the_store(qtbot, page, tiny_model_dir, tmp_path):
    adapter = str(build_adapter_dir(tiny_model_dir, tmp_path / "adapter", seed=4))
    page.prompt.setPlainText("What is the capital of France?")
    page.temperature.setValue(0.0)
    page.max_new_tokens.setValue(12)
    page.seed.setValue(5)

    assert _send(qtbot, page)  # base against base: streamed, the same answer, nothing to choose
    base_text = page.answers[0].toPlainText()
    assert base_text and page.answers[1].toPlainText() == base_text
    assert "same answer" in page.status.text() and not page.left_button.isEnabled()

    page.sides[1].adapter.setEditText(adapter)
    _send(qtbot, page)
    assert page.answers[0].toPlainText() == base_text  # the adapter is attached but off for the base side
    assert page.answers[1].toPlainText() != base_text
    assert page.right_button.isEnabled()
    qtbot.mouseClick(page.right_button, Qt.MouseButton.LeftButton)
    assert page.recorded and "Right is better" in page.status.text()

    other = Store()
    try:
        pairs = other.preferences.pairs()
        assert len(pairs) == 1
        assert pairs[0].chosen[-1]["content"].splitlines() == page.answers[1].toPlainText().splitlines()
        assert pairs[0].rejected[-1]["content"].splitlines() == base_text.splitlines()
        chosen = other.preferences.candidate(pairs[0].chosen_id)
        assert (chosen["adapter"], chosen["seed"], chosen["source"]) == (adapter, 5, "compare")
    finally:
        other.close()


def test_runs_are_offered_by_name_with_their_parent_and_sent_by_id(qtbot, page):
    store = page.store
    sft = store.create_run({"model": "m", "objective": "sft"}, run_id="20261207-013549-58921c", name="sft-demo")
    dpo = store.create_run(
        {"model": "m", "objective": "dpo"}, run_id="20261207-020000-aaaaaa", name="dpo-1", parent_run_id=sft
    )
    for rid in (sft, dpo):
        store.update_run(rid, status="completed")
    page.refresh()
    combo = page.sides[1].adapter
    texts = [combo.itemText(i) for i in range(combo.count())]
    assert "sft-demo" in texts and "dpo-1 from sft-demo" in texts
    assert not any(t.startswith("2026") for t in texts)  # no ids on show
    combo.setCurrentIndex(texts.index("dpo-1 from sft-demo"))
    assert dpo in combo.itemData(combo.currentIndex(), Qt.ItemDataRole.ToolTipRole)
    side = page._side(page.sides[1], "m")
    assert side.adapter == dpo  # the worker gets the run's id
    assert page.heading(side) == "dpo-1 from sft-demo"
    assert page.heading(page._side(page.sides[0], "m")) == "Base model (adapters off)"
    page.refresh()  # a refresh keeps the choice
    assert page._side(page.sides[1], "m").adapter == dpo


def test_run_labels_tell_apart_runs_with_one_name():
    from finetune_studio.studio.state.run_labels import run_label, run_labels

    runs = [
        {"id": "a", "name": "sft-demo", "created_at": 1.0e9},
        {"id": "b", "name": "sft-demo", "created_at": 1.0e9 + 60},
        {"id": "c", "name": "dpo", "parent_run_id": "a"},
    ]
    labels = run_labels(runs)
    assert labels["c"].startswith("dpo from sft-demo")
    assert labels["a"] != labels["b"] and labels["a"].startswith("sft-demo (")
    assert run_label({"id": "x", "name": ""}) == "x"
