"""The Annotate page's queue order with a real scorer: an adapter folder of the tiny model scores a session's answers
by its implicit reward in the real generation worker ("least sure first"), the window keeps running meanwhile,
the model's guess for the pair on screen appears nowhere before the decision, and the agreement line follows it."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QProcess, Qt, QTimer
from PySide6.QtWidgets import QAbstractButton, QComboBox, QLabel, QLineEdit, QPlainTextEdit, QTextEdit

from finetune_studio.core import label_queue as lq
from finetune_studio.core.store import Store
from finetune_studio.studio.state import annotation as an

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")
PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "What is rain?"]


@pytest.fixture
def make_page(qtbot):
    from finetune_studio.studio.pages.annotate.page import AnnotatePage

    pages, stores = [], []

    def make(model: str):
        store = Store()
        page = AnnotatePage(lambda: store, lambda: model)
        page.resize(1024, 700)
        page.show()
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


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from tiny_model import build_adapter_dir

    return build_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("scorer") / "dpo-adapter", seed=3)


def everything_shown(page) -> str:
    """Every text the page shows a person: labels, buttons, boxes, answers, tooltips."""
    out = []
    for w in page.findChildren(QLabel):
        out.append(w.text())
    for w in page.findChildren(QAbstractButton):
        out.append(w.text())
    for w in page.findChildren(QLineEdit):
        out.append(w.text())
    for w in page.findChildren(QComboBox):
        out += [w.itemText(i) for i in range(w.count())]
    for w in page.findChildren(QTextEdit) + page.findChildren(QPlainTextEdit):
        out.append(w.toPlainText())
    out += [w.toolTip() for w in page.findChildren(QLabel)]
    return "\n".join(out)


def _session(page, model: str) -> None:
    """A session of 4 prompts x 4 answers (8 pairs) in the store, opened on the page as a person reopens one."""
    prefs = page.store.preferences
    spec = an.SessionSpec(
        "order", PROMPTS, an.Side(model=model, seed=1), an.Side(model=model, seed=2), pairs_per_prompt=2
    )
    spec.annotator = "ann"
    for p in PROMPTS:
        pid = prefs.add_prompt(p, source=spec.source)
        ids = [prefs.add_candidate(pid, f"{p} Answer {k}: " + "blue " * k) for k in range(4)]
        spec.items += [an.Item(pid, ids[0], ids[1]), an.Item(pid, ids[2], ids[3])]
    spec.save()
    page.open_session("order")


def test_least_sure_first_by_an_adapters_implicit_reward(qtbot, make_page, tiny_model_dir, adapter_dir):
    page = make_page(str(tiny_model_dir))
    _session(page, str(tiny_model_dir))
    st = page.state
    assert len(st.items) == 8 and st.queue == list(range(8)) and not page.agreement_label.isVisible()

    page.choose_scorer_folder = lambda: str(adapter_dir)
    qtbot.mouseClick(page.scorer_folder_button, Qt.MouseButton.LeftButton)
    assert st.scorer is not None and (st.scorer.kind, st.scorer.source) == ("implicit_dpo", str(adapter_dir))
    ticks = []
    timer = QTimer(page)
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    with qtbot.waitSignal(page.scoring.finished, timeout=120_000) as scored:
        page.order_box.setCurrentIndex(page.order_box.findData("least_sure"))  # as a person picks it
        assert page.scoring.running and not st.rewards  # the answer comes later, through the event loop
    timer.stop()
    assert scored.args == [""], page.form.status.text()
    assert ticks, "the event loop did not run while the worker scored"
    assert "the queue is least sure first" in page.form.status.text()

    rewards = st.rewards
    assert len(rewards) == 16 and len(set(rewards.values())) > 1  # every answer, and the adapter tells them apart
    gaps = [abs(lq.margin(rewards, i.a, i.b)) for i in st.items]
    assert [gaps[i] for i in st.queue] == sorted(gaps) and st.index == st.queue[0]
    assert page.label_view.position.text().startswith("Pair 1 of 8")

    # Before the decision: no trace of the model's guess for the pair on screen, anywhere on the page.
    item = st.item
    m = lq.margin(rewards, item.left, item.right)
    shown = everything_shown(page)
    assert "The model preferred" not in shown and "(predicted gap " not in shown and f"{abs(m):.2f})" not in shown
    assert "model agreed" not in shown and "did not agree" not in shown
    assert page.label_view.decision.text() == "Decision: Not decided yet"
    assert page.agreement_label.isVisible()
    assert page.agreement_label.text().startswith("The model's agreement with you shows here after your first pick")

    qtbot.keyClick(page.label_view, Qt.Key.Key_A)  # left is better: saved, the next pair of the queue is shown
    assert page.labeller.state(item).decision == "left" and st.index == st.queue[1]
    verdict = "agreed" if m > 0 else "did not agree"
    assert page.agreement_label.text().startswith(f"The model {verdict} with you on your last decision.")
    assert "preferred" not in page.label_view.decision.text()  # the new pair is undecided
    qtbot.keyClick(page.label_view, Qt.Key.Key_K)  # back to the decided pair: now its prediction is shown
    side = "A (left)" if m > 0 else "B (right)"
    assert f"The model preferred {side} (predicted gap {abs(m):.2f})" in page.label_view.decision.text()


def test_a_scorer_that_fails_is_a_message(qtbot, make_page, tiny_model_dir, tmp_path):
    page = make_page(str(tiny_model_dir))
    _session(page, str(tiny_model_dir))
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")  # looks like an adapter; the worker cannot load it
    page.scorer_box.setEditText(str(broken))
    page._scorer_chosen()
    with qtbot.waitSignal(page.scoring.finished, timeout=60_000) as scored:
        page.order_box.setCurrentIndex(page.order_box.findData("largest_gap"))
    assert scored.args[0].startswith("The scorer could not be loaded"), scored.args
    assert page.form.status.text() == scored.args[0] and page.state.rewards == {}
    page.scorer_box.setEditText(str(tmp_path / "nowhere"))
    page._scorer_chosen()
    assert "does not exist" in page.form.status.text()
    assert page.state.queue == list(range(8))  # unscored: the order they were added in
