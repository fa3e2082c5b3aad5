"""Hyper-parameter forms generated from ``TrainConfig.field_help()``.

One editor per field (check box for flags, combo box for choices, line edit
for the rest), the field's help as its tooltip, and an error line under it
that shows the :class:`SetupState`'s message for that field.
"""

from __future__ import annotations

from typing import cast

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLabel, QLineEdit, QVBoxLayout, QWidget

from finetune_studio.studio.state.setup import HELP, SetupState
from finetune_studio.studio.widgets.run_choice import RunChoice

LABELS = {
    "lr": "LR",
    "max_steps": "Steps",
    "learning_rate": "Learning rate",
    "batch_size": "Batch size",
    "gradient_accumulation_steps": "Gradient accumulation",
    "max_length": "Max length (tokens)",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "target_modules": "LoRA target modules",
    "dpo_beta": "DPO beta",
    "dpo_loss": "DPO loss",
    "dpo_label_smoothing": "DPO label smoothing",
    "use_rslora": "rsLoRA scaling",
    "loss_on": "Loss on",
    "run_name": "Run name",
    "lr_scheduler": "LR schedule",
    "num_epochs": "Epochs (0 = use steps)",
    "distill_student_layers": "Student layers",
}


def label_for(name: str) -> str:
    return LABELS.get(name, name.replace("_", " ").capitalize())


class ErrorLabel(QLabel):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("fieldError")
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.hide()

    def show_error(self, text: str) -> None:
        self.setText(text)
        self.setVisible(bool(text))


class ConfigForm(QWidget):
    """Editors for ``names``; keeps them in step with ``state`` both ways."""

    def __init__(self, state: SetupState, names: list[str], parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.names = names
        self.editors: dict[str, QWidget] = {}
        self.errors: dict[str, ErrorLabel] = {}
        self._syncing = False
        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setContentsMargins(0, 0, 0, 0)
        for name in names:
            editor = self._make_editor(name)
            editor.setObjectName(f"field_{name}")
            editor.setToolTip(HELP[name]["help"])
            error = ErrorLabel(self)
            box = QWidget(self)
            col = QVBoxLayout(box)
            col.setContentsMargins(0, 0, 0, 0)
            col.setSpacing(2)
            col.addWidget(editor)
            col.addWidget(error)
            label = QLabel(label_for(name), self)
            label.setToolTip(HELP[name]["help"])
            label.setBuddy(editor)
            form.addRow(label, box)
            self.editors[name], self.errors[name] = editor, error
        self._load_values()
        self._show_errors()
        state.subscribe(self._on_state)

    def _make_editor(self, name: str) -> QWidget:
        meta = HELP[name]
        if isinstance(meta["default"], bool):
            box = QCheckBox(self)
            box.toggled.connect(lambda on, n=name: self._edited(n, on))
            return box
        if name == "init_adapter":  # runs by name, their ids in the config
            choice = RunChoice(self)
            choice.editTextChanged.connect(lambda _text, n=name, c=choice: self._edited(n, c.value()))
            return choice
        if "choices" in meta:
            combo = QComboBox(self)
            combo.addItems(list(meta["choices"]))
            combo.currentTextChanged.connect(lambda text, n=name: self._edited(n, text))
            return combo
        edit = QLineEdit(self)
        edit.setPlaceholderText(str(self.state.values[name]) if name != "run_name" else "picked from the model")
        edit.textEdited.connect(lambda text, n=name: self._edited(n, text))
        return edit

    def _edited(self, name: str, value) -> None:
        if not self._syncing:
            self.state.set(name, value)

    def _on_state(self, topic: str) -> None:
        if topic.startswith("values"):
            self._load_values()
        elif topic == "errors":
            self._show_errors()

    def _load_values(self) -> None:
        self._syncing = True
        try:
            for name, editor in self.editors.items():
                value = self.state.values[name]
                if isinstance(editor, RunChoice):
                    if editor.value() != str(value):
                        editor.show_value(str(value))
                elif isinstance(editor, QCheckBox):
                    editor.setChecked(bool(value))
                elif isinstance(editor, QComboBox):
                    editor.setCurrentText(str(value))
                elif cast(QLineEdit, editor).text() != value:
                    cast(QLineEdit, editor).setText(str(value))
        finally:
            self._syncing = False

    def _show_errors(self) -> None:
        for name, label in self.errors.items():
            text = self.state.errors.get(name, "")
            label.show_error(text)
            editor = self.editors[name]
            if bool(editor.property("invalid")) != bool(text):
                editor.setProperty("invalid", bool(text))
                editor.style().unpolish(editor)
                editor.style().polish(editor)
