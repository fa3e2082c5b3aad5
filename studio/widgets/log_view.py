"""The run's log: engine stderr, log events and the app's own notes, appended as they come."""

from __future__ import annotations

from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QPlainTextEdit, QWidget

from finetune_studio.studio.state.run import LOG_LINES, RunState


class LogView(QPlainTextEdit):
    def __init__(self, state: RunState, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("logView")
        self.state = state
        self.setReadOnly(True)
        self.setMaximumBlockCount(LOG_LINES)
        self.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.setPlaceholderText("The engine's log appears here.")
        self._shown = 0
        state.subscribe(self._on_state)

    def _on_state(self, topic: str) -> None:
        if topic != "log":
            return
        if not self.state.log:
            self.clear()
            self._shown = 0
            return
        self.appendPlainText(self.state.log[-1])
