"""A field that names a run's adapter: the runs listed by name ("dpo-1 from sft-demo", the id in a tooltip), or
any text (an adapter folder, ``run:step-000040``). Its value is what the engine reads: the run's id, not its name."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QWidget

from finetune_studio.core.run_status import is_exportable
from finetune_studio.core.store import Store
from finetune_studio.studio.state.run_labels import field, run_labels, run_tooltip


def stored_runs() -> list:
    """The database's runs (an unreadable database: none; the field still takes a folder)."""
    try:
        store = Store()
    except (OSError, sqlite3.Error):
        return []
    try:
        return list(store.list_runs())
    except (OSError, sqlite3.Error):
        return []
    finally:
        store.close()


class RunChoice(QComboBox):
    """An editable list of the runs that have an adapter, read again each time it opens."""

    def __init__(self, parent: QWidget | None = None, runs: Callable[[], list] = stored_runs):
        super().__init__(parent)
        self.setEditable(True)
        self.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        line = self.lineEdit()
        assert line is not None
        line.setPlaceholderText("none: a run by name, or an adapter folder")
        self.runs = runs
        self.ids: dict[str, str] = {}  # label -> run id

    def refresh(self) -> None:
        everyone = self.runs()
        with_adapter = [r for r in everyone if is_exportable(str(field(r, "status") or ""))]
        labels = run_labels(with_adapter, everyone)
        text = self.currentText()
        self.blockSignals(True)
        self.clear()
        self.ids = {}
        for run in with_adapter:
            rid = field(run, "id")
            self.addItem(labels[rid], rid)
            self.setItemData(self.count() - 1, run_tooltip(run), Qt.ItemDataRole.ToolTipRole)
            self.ids[labels[rid]] = rid
        self.setEditText(text)
        self.blockSignals(False)

    def showPopup(self) -> None:
        self.refresh()
        super().showPopup()

    def value(self) -> str:
        """The run's id for a run shown by name (with what follows it, such as ``:step-000040``), else the text."""
        text = self.currentText().strip()
        for label, rid in sorted(self.ids.items(), key=lambda item: -len(item[0])):
            if text == label or text.startswith(label + ":"):
                return rid + text[len(label) :]
        return text

    def show_value(self, value: str) -> None:
        """Show ``value`` (a run id, maybe with ``:step-…``) by the run's name."""
        if value and not self.ids:
            self.refresh()
        for label, rid in self.ids.items():
            if value == rid or value.startswith(rid + ":"):
                self.setEditText(label + value[len(rid) :])
                return
        self.setEditText(value)
