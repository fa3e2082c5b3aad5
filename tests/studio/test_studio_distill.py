"""Set up offers distillation: the Distil objective shows its teacher and settings (only then), the teacher is
required with core.config's message beside it, and what is typed becomes the run's config."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from finetune_studio.studio.pages.setup_page import SetupPage
from finetune_studio.studio.state.run import MemoryState
from finetune_studio.studio.state.setup import SetupState

# the offscreen platform's note on a window being shown, not the app's warning
pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


def test_distil_shows_its_teacher_and_settings_only_while_chosen(qtbot, tmp_path):
    page = SetupPage(SetupState({"dataset": str(tmp_path / "d.jsonl")}), MemoryState())
    qtbot.addWidget(page)
    page.resize(1100, 800)
    page.show()
    try:
        teacher = page.basic_form.editors["distill_teacher"]
        alpha = page.advanced_form.editors["distill_alpha"]
        assert page.objective.buttons["distill"].text() == "Distil"
        assert not teacher.isVisibleTo(page.basic_form) and not alpha.isVisibleTo(page.advanced_form)

        qtbot.mouseClick(page.objective.buttons["distill"], Qt.MouseButton.LeftButton)
        assert page.state.values["objective"] == "distill"
        assert teacher.isVisibleTo(page.basic_form) and alpha.isVisibleTo(page.advanced_form)
        assert page.objective_about.text().startswith("Distillation trains the model")
        # no teacher yet: core.config's message beside the field, Start held back
        assert page.basic_form.errors["distill_teacher"].text() == (
            "Name the teacher: a model folder, 'default', or a run id / adapter folder of a tuned model"
        )
        assert not page.start_button.isEnabled()

        qtbot.keyClicks(teacher, "default")
        assert page.basic_form.errors["distill_teacher"].text() == ""
        assert page.state.config is not None and page.state.config.objective == "distill"
        assert page.state.config.distill_teacher == "default"

        qtbot.mouseClick(page.objective.buttons["sft"], Qt.MouseButton.LeftButton)
        assert not teacher.isVisibleTo(page.basic_form) and not alpha.isVisibleTo(page.advanced_form)
    finally:
        page.shutdown()
        worker = page._own_worker
        if worker is not None:
            qtbot.waitUntil(lambda: not worker.running, timeout=20_000)
