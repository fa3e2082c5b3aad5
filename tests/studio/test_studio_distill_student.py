"""Set up's student of a distillation: "this model" or "this model with N layers" (only while Distil is chosen), the
number bounded by the model's layers, chosen by keyboard, the one line on the chosen student, a number the model
cannot take refused beside it; the method list offers a full fine-tune."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from finetune_studio.core.protocol.events import ModelReady
from finetune_studio.studio.pages.setup_page import SetupPage
from finetune_studio.studio.state.run import MemoryState
from finetune_studio.studio.state.setup import SetupState

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


@pytest.fixture
def page(qtbot, tmp_path):
    state = SetupState({"dataset": str(tmp_path / "d.jsonl"), "distill_teacher": "default"})
    page = SetupPage(state, MemoryState())
    qtbot.addWidget(page)
    page.resize(1024, 700)
    page.show()
    qtbot.waitExposed(page)
    yield page
    page.shutdown()
    worker = page._own_worker
    if worker is not None:
        qtbot.waitUntil(lambda: not worker.running, timeout=20_000)


def _model(layers: int) -> ModelReady:
    return ModelReady(name="tiny", path="/models/tiny", layers=layers, parameters=1_000_000)


def test_the_student_is_chosen_by_keyboard_and_bounded_by_the_models_layers(qtbot, page):
    st, student = page.state, page.student
    assert not student.isVisibleTo(page)  # SFT: no student to choose
    qtbot.mouseClick(page.objective.buttons["distill"], Qt.MouseButton.LeftButton)
    assert student.isVisibleTo(page) and page.student_title.isVisibleTo(page)
    st.set_model_info(_model(8))
    # the model as it is, by default; "with N layers" offers half of its 8 layers, at most 7
    assert student.whole.isChecked() and st.values["distill_student_layers"] == "0"
    assert (student.layers.value(), student.layers.maximum(), student.layers_of.text()) == (4, 7, "of 8 layers")
    assert student.about.text() == "The student is this model, all of its layers."
    assert st.config is not None and st.config.distill_student_layers == 0

    # the keyboard: the option has the focus, an arrow key chooses the other one; then Tab to the number and type
    student.whole.setFocus()
    qtbot.keyClick(student.whole, Qt.Key.Key_Right)
    assert student.pruned.isChecked() and st.values["distill_student_layers"] == "4"
    assert st.config is not None and st.config.distill_student_layers == 4
    assert student.about.text() == "The engine keeps the 4 of its 8 layers that matter most on the training data."
    student.layers.setFocus()
    qtbot.keyClick(student.layers, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClicks(student.layers, "3")
    assert st.values["distill_student_layers"] == "3" and st.config.distill_student_layers == 3
    qtbot.keyClick(student.layers, Qt.Key.Key_Up)
    assert st.config is not None and st.config.distill_student_layers == 4
    # back to the model as it is: the number stays for later, the config trains the whole model
    student.pruned.setFocus()  # Shift+Tab from the number
    qtbot.keyClick(student.pruned, Qt.Key.Key_Left)
    assert student.whole.isChecked() and st.config is not None and st.config.distill_student_layers == 0
    assert student.layers.value() == 4
    # stepping the number chooses "with N layers" again
    qtbot.keyClick(student.layers, Qt.Key.Key_Down)
    assert student.pruned.isChecked() and st.config is not None and st.config.distill_student_layers == 3


def test_a_student_the_model_cannot_make_is_refused_beside_the_choice(qtbot, page):
    st, student = page.state, page.student
    st.set_model_info(_model(4))
    st.load({"objective": "distill", "distill_student_layers": 6})  # a past run's config, of a deeper model
    assert student.pruned.isChecked() and student.layers.value() == 6  # shown as it is, with what is wrong
    want = (
        "The model has 4 layers: a smaller student keeps 1 to 3 of them (choose 'this model' to distil into it as it "
        "is)."
    )
    assert st.errors["distill_student_layers"] == want and student.error.text() == want
    assert student.error.isVisibleTo(page) and not page.start_button.isEnabled()
    assert "student layers" in page.blockers.text()
    student.layers.setValue(2)
    assert "distill_student_layers" not in st.errors and not student.error.isVisibleTo(page)
    assert student.layers.maximum() == 3


def test_another_objective_keeps_the_student_for_later_and_trains_without_it(qtbot, page):
    st, student = page.state, page.student
    st.set_model_info(_model(6))
    qtbot.mouseClick(page.objective.buttons["distill"], Qt.MouseButton.LeftButton)
    qtbot.mouseClick(student.pruned, Qt.MouseButton.LeftButton)
    assert st.config is not None and st.config.distill_student_layers == 3
    qtbot.mouseClick(page.objective.buttons["sft"], Qt.MouseButton.LeftButton)
    assert not student.isVisibleTo(page)
    # core.config refuses a pruned student outside a distillation; the form leaves it out instead of blocking Start
    assert st.config is not None and st.config.distill_student_layers == 0 and not st.errors
    qtbot.mouseClick(page.objective.buttons["distill"], Qt.MouseButton.LeftButton)
    assert student.pruned.isChecked() and st.config is not None and st.config.distill_student_layers == 3


def test_full_fine_tune_is_offered_with_the_other_methods(qtbot, page):
    button = page.method.buttons["full"]
    assert button.text() == "Full fine-tune" and "every weight" in button.toolTip()
    qtbot.mouseClick(page.objective.buttons["distill"], Qt.MouseButton.LeftButton)
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    assert page.state.config is not None and page.state.config.method == "full"
    assert page.method_about.text().startswith("Trains every weight of the model")


def test_the_student_fits_a_small_screen_without_sideways_scrolling(qtbot, page):
    page.resize(1024, 600)
    page.state.set_model_info(_model(30))
    qtbot.mouseClick(page.objective.buttons["distill"], Qt.MouseButton.LeftButton)
    qtbot.mouseClick(page.student.pruned, Qt.MouseButton.LeftButton)
    qtbot.wait(50)
    viewport = page.settings_scroll.viewport()
    right = page.student.layers_of.mapTo(viewport, page.student.layers_of.rect().topRight()).x()
    assert right <= viewport.width(), (right, viewport.width())
    assert page.student.layers_of.text() == "of 30 layers"
