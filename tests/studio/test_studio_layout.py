"""What a person meets through the window: the wheel scrolls forms instead of changing settings, and the window
fits small screens (1024×768, 1366×768 at 125 %)."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QApplication, QComboBox, QScrollArea, QSpinBox, QWidget
from studio_support import IGNORE_OFFSCREEN

from finetune_studio.studio.widgets.wheel_guard import guard_wheel

pytestmark = IGNORE_OFFSCREEN


def wheel_at(widget: QWidget, steps: int = -1) -> QWidget:
    """Turn the wheel over the middle of ``widget`` as the window system would: the event goes to whatever widget
    is under the pointer there, through QApplication. Returns that widget."""
    centre = widget.rect().center()
    global_pos = widget.mapToGlobal(centre)
    target = widget.window().childAt(widget.window().mapFromGlobal(global_pos)) or widget
    local = target.mapFromGlobal(global_pos)
    event = QWheelEvent(
        QPointF(local),
        QPointF(global_pos),
        QPoint(0, 0),
        QPoint(0, 120 * steps),
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
        Qt.ScrollPhase.NoScrollPhase,
        False,
    )
    QApplication.sendEvent(target, event)
    return target


def scrolled_into_view(area: QScrollArea, widget: QWidget, qtbot) -> None:
    area.ensureWidgetVisible(widget, 0, 60)
    qtbot.wait(20)


@pytest.fixture
def setup_window(make_window, qtbot):
    win = make_window({})
    win.setup_page.advanced_toggle.setChecked(True)
    win.resize(1024, 600)  # the advanced form is taller than the panel: the panel scrolls
    win.show()
    qtbot.waitExposed(win)
    return win


def test_wheel_over_an_advanced_drop_down_scrolls_the_panel_and_leaves_the_setting(setup_window, qtbot):
    page = setup_window.setup_page
    area = page.findChild(QScrollArea, "settingsScroll")
    combo = page.advanced_form.editors["loss_on"]
    assert isinstance(combo, QComboBox)
    scrolled_into_view(area, combo, qtbot)
    bar = area.verticalScrollBar()
    assert bar.maximum() > 0, "the panel must be taller than the window for this test"
    bar.setValue(bar.maximum() // 2)
    scrolled_into_view(area, combo, qtbot)
    before_value, before_scroll = combo.currentText(), bar.value()
    assert not combo.hasFocus()

    target = wheel_at(combo, steps=-1)  # down: a plain combo box would step to the next choice

    assert target is combo or combo.isAncestorOf(target)
    assert combo.currentText() == before_value
    assert page.state.values["loss_on"] == before_value
    assert bar.value() > before_scroll, "the panel scrolls on under the pointer"


def test_wheel_changes_a_drop_down_once_it_has_the_focus(setup_window, qtbot):
    page = setup_window.setup_page
    area = page.findChild(QScrollArea, "settingsScroll")
    combo = page.advanced_form.editors["lr_scheduler"]
    scrolled_into_view(area, combo, qtbot)
    setup_window.activateWindow()
    combo.setFocus(Qt.FocusReason.MouseFocusReason)
    qtbot.waitUntil(combo.hasFocus, timeout=2000)
    before = combo.currentIndex()

    wheel_at(combo, steps=-1 if before < combo.count() - 1 else 1)

    assert combo.currentIndex() != before
    assert page.state.values["lr_scheduler"] == combo.currentText()


def test_the_wheel_never_gives_a_guarded_box_the_focus(setup_window):
    win = setup_window
    pages = (win.setup_page, win.runs_page, win.compare_page, win.annotate_page)  # the window guards every page
    boxes = [w for page in pages for w in page.findChildren(QWidget) if isinstance(w, (QComboBox, QSpinBox))]
    assert any(win.annotate_page.isAncestorOf(b) for b in boxes)
    assert len(boxes) > 10
    assert all(b.focusPolicy() == Qt.FocusPolicy.StrongFocus for b in boxes)


def test_a_spin_box_outside_a_scroll_area_ignores_the_wheel_without_focus(qtbot):
    holder = QWidget()
    qtbot.addWidget(holder)
    spin = QSpinBox(holder)
    spin.setRange(0, 10)
    spin.setValue(5)
    guard_wheel(holder)
    holder.show()
    qtbot.waitExposed(holder)
    wheel_at(spin, steps=1)
    assert spin.value() == 5
    assert guard_wheel(holder) == 0  # guarding again changes nothing


# 1024×768 less a window frame and a panel; 1366×768 at 125 % is about 1093×614 logical pixels, less the same.
SCREEN_1024 = (1024, 700)
PAGE_LIMIT = (1000, 500)  # a page's own minimum, so that the window fits both screens with the tab bar and status bar


@pytest.mark.parametrize("name", ["setup_page", "train_page", "runs_page", "compare_page"])
def test_each_page_fits_a_small_screen(make_window, qtbot, name):
    win = make_window({})
    win.setup_page.advanced_toggle.setChecked(True)  # the tallest and widest Set up
    win.show()
    page = getattr(win, name)
    win.tabs.setCurrentWidget(page)
    qtbot.waitExposed(win)
    hint = page.minimumSizeHint()
    assert hint.width() <= PAGE_LIMIT[0] and hint.height() <= PAGE_LIMIT[1], (name, hint)


def test_the_window_fits_1024_by_700_with_every_page_shown(make_window, qtbot):
    win = make_window({})
    win.setup_page.advanced_toggle.setChecked(True)
    win.show()
    qtbot.waitExposed(win)
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
        hint = win.minimumSizeHint()
        assert hint.width() <= SCREEN_1024[0] and hint.height() <= SCREEN_1024[1], (win.tabs.tabText(i), hint)
    win.resize(*SCREEN_1024)
    assert (win.width(), win.height()) == SCREEN_1024


def test_a_row_of_buttons_wraps_in_a_narrow_window(qtbot):
    from PySide6.QtWidgets import QPushButton, QVBoxLayout

    from finetune_studio.studio.widgets.flow_layout import FlowLayout

    holder = QWidget()
    qtbot.addWidget(holder)
    row_widget = QWidget(holder)
    row = FlowLayout(row_widget)
    buttons = [QPushButton(f"A button called {i}", row_widget) for i in range(6)]
    for b in buttons:
        row.addWidget(b)
    QVBoxLayout(holder).addWidget(row_widget)
    one_row = sum(b.sizeHint().width() for b in buttons)
    assert holder.minimumSizeHint().width() < one_row / 3  # no longer the whole row's width
    holder.resize(one_row + 200, 200)
    holder.show()
    qtbot.waitExposed(holder)
    assert len({b.y() for b in buttons}) == 1
    holder.resize(one_row // 2, 200)
    qtbot.waitUntil(lambda: len({b.y() for b in buttons}) > 1, timeout=2000)
    assert all(b.geometry().right() <= row_widget.width() for b in buttons)
    assert row_widget.height() >= max(b.geometry().bottom() for b in buttons)  # the rows below are not cut off


def test_set_up_says_what_to_fix_and_marks_it(make_window, qtbot):
    from PySide6.QtWidgets import QLabel

    win = make_window({"dataset": ""})
    win.show()
    page = win.setup_page
    qtbot.waitUntil(lambda: "dataset" in page.state.errors, timeout=10_000)
    assert "red: dataset." in page.blockers.text()
    assert page.dataset_panel.path.property("invalid") is True  # the red the memory panel speaks of
    labels = [w.text() for w in page.advanced_form.findChildren(QLabel)]
    assert "LoRA dropout" in labels and "Lora dropout" not in labels


def test_the_model_look_up_is_news_not_an_error(make_window, qtbot):
    from studio_support import fake_engine

    win = make_window({"model": "org/some-model"})
    panel = win.setup_page.model_panel
    panel.job.command = fake_engine("time.sleep(30)")
    panel.resolve()
    assert panel.looking_up and panel.busy_note.isVisibleTo(panel)
    assert "prepared once" in panel.busy_note.text() and not panel.message.isVisibleTo(panel)
    panel.job.cancel()


def test_a_chosen_preset_leaves_a_trace_and_advanced_opens_in_view(make_window, qtbot):
    win = make_window({})
    win.resize(1024, 600)
    win.show()
    qtbot.waitExposed(win)
    page = win.setup_page
    assert page.presets, "the bundled presets"
    page.preset_box.activated.emit(1)
    assert page.preset_note.isVisibleTo(page) and page.presets[0].name in page.preset_note.text()
    assert page.preset_box.currentIndex() == 0  # ready for another choice
    page.advanced_toggle.setChecked(True)
    area = page.settings_scroll
    qtbot.waitUntil(lambda: area.verticalScrollBar().value() > 0, timeout=2000)
    top = page.advanced_form.mapTo(area.viewport(), page.advanced_form.rect().topLeft()).y()
    assert 0 <= top < area.viewport().height() // 3  # the advanced settings fill the panel, not its last two rows


def test_the_train_pages_log_and_samples_are_readable(make_window, qtbot):
    win = make_window({})
    win.resize(1024, 700)
    win.show()
    win.tabs.setCurrentWidget(win.train_page)
    qtbot.waitExposed(win)
    log = win.train_page.log_view  # the Log, Samples and Config tabs share one height
    lines = log.viewport().height() / log.fontMetrics().lineSpacing()
    assert lines >= 7, lines
