"""Set up offers PPO: its button, its sentence, the rewards editor it shares with GRPO and only its own ppo_* rows."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from finetune_studio.studio.pages.setup_page import SetupPage
from finetune_studio.studio.state.run import MemoryState
from finetune_studio.studio.state.setup import SetupState

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # the offscreen platform's


def test_ppo_shows_the_rewards_editor_and_its_own_settings(qtbot, tmp_path):
    page = SetupPage(SetupState({"dataset": str(tmp_path / "d.jsonl")}), MemoryState())
    qtbot.addWidget(page)
    page.resize(1100, 800)
    page.show()
    try:
        rows = page.advanced_form.editors
        assert page.objective.buttons["ppo"].text() == "PPO"
        assert not rows["ppo_epochs"].isVisibleTo(page.advanced_form)
        qtbot.mouseClick(page.objective.buttons["ppo"], Qt.MouseButton.LeftButton)
        assert page.rewards_editor.isVisible() and page.objective_about.text().startswith("PPO trains the model")
        assert all(rows[name].isVisibleTo(page.advanced_form) for name in ("ppo_epochs", "ppo_kl_coef", "ppo_lambda"))
        assert not rows["grpo_group_size"].isVisibleTo(page.advanced_form)
        assert not page.start_button.isEnabled() and "rewards" in page.blockers.text()
        editor = page.rewards_editor
        editor.kind_box.setCurrentIndex(editor.kind_box.findData("json_valid"))
        qtbot.mouseClick(editor.add_button, Qt.MouseButton.LeftButton)
        assert page.start_button.isEnabled()
        config = page.state.config
        assert config.objective == "ppo" and [r["kind"] for r in config.rewards] == ["json_valid"]
        qtbot.mouseClick(page.objective.buttons["grpo"], Qt.MouseButton.LeftButton)
        assert not rows["ppo_epochs"].isVisibleTo(page.advanced_form)
        assert rows["grpo_group_size"].isVisibleTo(page.advanced_form) and page.state.config.rewards
    finally:
        page.shutdown()
