"""The rewards editor on Set up (GRPO): the reward functions each sampled answer is scored with, and their weights.

One box per reward: its kind and what it rewards, its weight, its parameters (check boxes, text fields, a file or
folder picker) and, in red under it, what ``core.rewards`` finds wrong with it; below them a kind to add and
*Add reward*, and *Try the rewards…*, which asks the page to open the reward workbench. Every edit goes to
:class:`SetupState` as the form's raw values (``studio.state.rewards``); the boxes are rebuilt only when rewards are
added, removed or loaded, so typing never loses the cursor.
"""

from __future__ import annotations

from typing import Any, cast

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.studio.state import rewards as reward_rows
from finetune_studio.studio.state.setup import SetupState
from finetune_studio.studio.widgets.config_form import ErrorLabel

INTRO = "Each sampled answer's reward is the weighted sum of these functions' scores."
ERROR_STYLE = "color: #d0503c;"  # as the form's own error lines (QLabel#fieldError in the style sheet)
HINT_STYLE = "color: palette(placeholder-text);"


class RewardBox(QFrame):
    """One reward: title, weight, remove; what it rewards; its parameters; its error."""

    def __init__(self, editor: RewardsEditor, index: int, row: dict[str, Any]):
        super().__init__(editor)
        self.editor, self.index = editor, index
        self.kind = str(row.get("kind", ""))
        self.setObjectName(f"reward_{index}")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        info = reward_rows.KINDS.get(self.kind)
        col = QVBoxLayout(self)
        col.setContentsMargins(6, 4, 6, 4)
        col.setSpacing(2)
        head = QHBoxLayout()
        self.title = QLabel(f"{index + 1}. {reward_rows.kind_label(self.kind)}", self)
        self.title.setObjectName(f"reward_{index}_title")
        self.title.setStyleSheet("font-weight: 600")
        head.addWidget(self.title, 1)
        head.addWidget(QLabel("Weight", self))
        self.weight = QLineEdit(self)
        self.weight.setObjectName(f"reward_{index}_weight")
        self.weight.setPlaceholderText("1")
        self.weight.setMaximumWidth(60)
        self.weight.setToolTip("Multiplies this function's scores in the total; 0 only watches it.")
        self.weight.textEdited.connect(lambda text: editor.edit(index, "weight", text))
        head.addWidget(self.weight)
        self.remove = QToolButton(self)
        self.remove.setObjectName(f"reward_{index}_remove")
        self.remove.setText("Remove")
        self.remove.setToolTip("Remove this reward")
        self.remove.clicked.connect(lambda: editor.remove(index))
        head.addWidget(self.remove)
        col.addLayout(head)
        if info is not None:
            sentence = QLabel(info.sentence, self)
            sentence.setObjectName(f"reward_{index}_about")
            sentence.setWordWrap(True)
            sentence.setStyleSheet(HINT_STYLE)
            col.addWidget(sentence)
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.fields: dict[str, QWidget] = {}
        name = QLineEdit(self)
        name.setObjectName(f"reward_{index}_name")
        name.setPlaceholderText(self.kind)
        name.setToolTip("The name the run's figures use for this function (reward/<name>); empty: the kind.")
        name.textEdited.connect(lambda text: editor.edit(index, "name", text))
        self.fields["name"] = name
        form.addRow("Name", name)
        for param in info.params if info is not None else ():
            widget = self._field(param)
            widget.setToolTip(param.help)
            label = QLabel(param.label if param.type != "bool" else "", self)
            label.setToolTip(param.help)
            form.addRow(label, widget)
        col.addLayout(form)
        self.error = ErrorLabel(self)
        self.error.setObjectName(f"reward_{index}_error")
        self.error.setStyleSheet(ERROR_STYLE)
        col.addWidget(self.error)
        self.load(row)

    def _field(self, param: reward_rows.Param) -> QWidget:
        index, editor = self.index, self.editor
        name = f"reward_{index}_{param.name}"
        if param.type == "bool":
            box = QCheckBox(param.label, self)
            box.setObjectName(name)
            box.toggled.connect(lambda on, p=param.name: editor.edit(index, p, on))
            self.fields[param.name] = box
            return box
        edit = QLineEdit(self)
        edit.setObjectName(name)
        edit.setPlaceholderText(param.placeholder)
        edit.textEdited.connect(lambda text, p=param.name: editor.edit(index, p, text))
        self.fields[param.name] = edit
        if param.type not in ("file", "folder"):
            return edit
        holder = QWidget(self)
        row = QHBoxLayout(holder)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(edit, 1)
        browse = QToolButton(holder)
        browse.setObjectName(f"{name}_browse")
        browse.setText("Browse…")
        browse.clicked.connect(lambda: self._browse(param, edit))
        row.addWidget(browse)
        return holder

    def _browse(self, param: reward_rows.Param, edit: QLineEdit) -> None:
        start = edit.text().strip()
        if param.type == "file":
            path, _ = QFileDialog.getOpenFileName(self, param.label, start, "Python files (*.py);;All files (*)")
        else:
            path = QFileDialog.getExistingDirectory(self, param.label, start)
        if path:
            edit.setText(path)
            self.editor.edit(self.index, param.name, path)

    def load(self, row: dict[str, Any]) -> None:
        """Show ``row``'s values (only where they differ, so a field being typed in keeps its cursor)."""
        texts: dict[str, Any] = {"weight": row.get("weight", ""), **row}
        if self.weight.text() != str(texts["weight"]):
            self.weight.setText(str(texts["weight"]))
        for key, widget in self.fields.items():
            value = texts.get(key, "")
            if isinstance(widget, QCheckBox):
                widget.blockSignals(True)
                widget.setChecked(bool(value))
                widget.blockSignals(False)
            elif cast(QLineEdit, widget).text() != str(value if value is not None else ""):
                cast(QLineEdit, widget).setText(str(value if value is not None else ""))

    def show_error(self, text: str) -> None:
        self.error.show_error(text)


class RewardsEditor(QGroupBox):
    """The list of rewards kept in ``state.values['rewards']``; ``try_requested`` asks for the workbench."""

    try_requested = Signal()
    added = Signal(object)  # the new reward's box (the page scrolls it into view)

    def __init__(self, state: SetupState, parent: QWidget | None = None):
        super().__init__("Rewards", parent)
        self.setObjectName("rewardsEditor")
        self.state = state
        self.boxes: list[RewardBox] = []
        self._kinds: list[str] = []
        col = QVBoxLayout(self)
        intro = QLabel(INTRO, self)
        intro.setWordWrap(True)
        intro.setStyleSheet(HINT_STYLE)
        col.addWidget(intro)
        self.list = QVBoxLayout()
        self.list.setSpacing(6)
        col.addLayout(self.list)
        self.empty = QLabel("No rewards yet: choose a kind below and press Add reward.", self)
        self.empty.setObjectName("rewardsEmpty")
        self.empty.setWordWrap(True)
        col.addWidget(self.empty)
        add = QHBoxLayout()
        self.kind_box = QComboBox(self)
        self.kind_box.setObjectName("addRewardKind")
        for kind, info in reward_rows.KINDS.items():
            self.kind_box.addItem(info.label, kind)
            self.kind_box.setItemData(self.kind_box.count() - 1, info.sentence, Qt.ItemDataRole.ToolTipRole)
        self.kind_box.currentIndexChanged.connect(self._kind_chosen)
        add.addWidget(self.kind_box, 1)
        self.add_button = QPushButton("Add reward", self)
        self.add_button.setObjectName("addRewardButton")
        self.add_button.clicked.connect(self.add_chosen)
        add.addWidget(self.add_button)
        col.addLayout(add)
        self.kind_about = QLabel(self)
        self.kind_about.setObjectName("addRewardAbout")
        self.kind_about.setWordWrap(True)
        self.kind_about.setStyleSheet(HINT_STYLE)
        col.addWidget(self.kind_about)
        self.whole_error = ErrorLabel(self)
        self.whole_error.setObjectName("rewardsError")
        self.whole_error.setStyleSheet(ERROR_STYLE)
        col.addWidget(self.whole_error)
        self.try_button = QPushButton("Try the rewards…", self)
        self.try_button.setObjectName("tryRewardsButton")
        self.try_button.setToolTip(
            "Sample a few answers from the model for some of the dataset's prompts and see what each reward makes "
            "of them, before training."
        )
        self.try_button.clicked.connect(self.try_requested)
        col.addWidget(self.try_button)
        self._kind_chosen()
        state.subscribe(self._on_state)
        self._sync()

    # --- editing --------------------------------------------------------------------
    @property
    def rows(self) -> list[dict[str, Any]]:
        rows = self.state.values.get(reward_rows.FIELD, [])
        return rows if isinstance(rows, list) else []

    def add(self, kind: str) -> None:
        self.state.set(reward_rows.FIELD, [*self.rows, reward_rows.new_row(kind)])

    def add_chosen(self) -> None:
        self.add(str(self.kind_box.currentData()))
        if self.boxes:  # the new reward's first field takes the keyboard
            box = self.boxes[-1]
            first = next((w for k, w in box.fields.items() if k != "name"), box.weight)
            first.setFocus()
            self.added.emit(box)

    def remove(self, index: int) -> None:
        rows = self.rows
        if 0 <= index < len(rows):
            self.state.set(reward_rows.FIELD, rows[:index] + rows[index + 1 :])

    def edit(self, index: int, key: str, value: Any) -> None:
        rows = [dict(r) for r in self.rows]
        if 0 <= index < len(rows) and rows[index].get(key) != value:
            rows[index][key] = value
            self.state.set(reward_rows.FIELD, rows)

    def _kind_chosen(self) -> None:
        info = reward_rows.KINDS.get(str(self.kind_box.currentData()))
        self.kind_about.setText(info.sentence if info else "")

    # --- showing --------------------------------------------------------------------
    def _on_state(self, topic: str) -> None:
        if topic in (f"values:{reward_rows.FIELD}", "values:*", "errors"):
            self._sync()

    def _sync(self) -> None:
        rows = self.rows
        kinds = [str(r.get("kind", "")) if isinstance(r, dict) else "" for r in rows]
        if kinds != self._kinds:
            self._rebuild(rows)
        else:
            for box, row in zip(self.boxes, rows, strict=True):
                box.load(row)
        check = self.state.reward_check
        for i, box in enumerate(self.boxes):
            box.show_error(check.rows.get(i, ""))
        self.whole_error.show_error(check.whole)
        self.empty.setVisible(not rows)
        self.try_button.setEnabled(bool(rows))

    def _rebuild(self, rows: list[Any]) -> None:
        for box in self.boxes:
            self.list.removeWidget(box)
            box.hide()
            box.deleteLater()
        self.boxes = [RewardBox(self, i, r if isinstance(r, dict) else {}) for i, r in enumerate(rows)]
        for box in self.boxes:
            self.list.addWidget(box)
            if self.isVisible():  # shown now, not at the layout's next turn: a field may take the focus at once
                box.show()
        self._kinds = [str(r.get("kind", "")) if isinstance(r, dict) else "" for r in rows]
