"""Set up's choice of a distillation's student: the chosen model as it is, or that model with N layers (the engine
prunes it on the training data, then distils the teacher into it). Bound to the set-up state's
``distill_student_layers`` (0 for the model as it is); the number is bounded by the model's layers once known.

Keyboard: Tab reaches the chosen option (the arrow keys move between the two) and then the number; typing a number or
stepping it chooses "with N layers".
"""

from __future__ import annotations

from PySide6.QtWidgets import QButtonGroup, QHBoxLayout, QLabel, QRadioButton, QSpinBox, QVBoxLayout, QWidget

from finetune_studio.core.config import INT_RANGES
from finetune_studio.studio.state.distill import (
    STUDENT_FIELD,
    STUDENT_HELP,
    student_layers,
    student_sentence,
)
from finetune_studio.studio.state.setup import SetupState
from finetune_studio.studio.widgets.config_form import ErrorLabel

MOST_LAYERS = INT_RANGES[STUDENT_FIELD][1]


class StudentChoice(QWidget):
    """Two options and a number of layers, with one line on the chosen student and the field's error under them."""

    def __init__(self, state: SetupState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.setToolTip(STUDENT_HELP)
        self.whole = QRadioButton("This model", self)
        self.whole.setObjectName("studentWhole")
        self.pruned = QRadioButton("This model with", self)
        self.pruned.setObjectName("studentPruned")
        self.group = QButtonGroup(self)
        for button in (self.whole, self.pruned):
            button.setToolTip(STUDENT_HELP)
            self.group.addButton(button)
        self.layers = QSpinBox(self)
        self.layers.setObjectName("studentLayers")
        self.layers.setToolTip(STUDENT_HELP)
        self.layers.setAccessibleName("Student layers")
        self.layers.setRange(1, MOST_LAYERS)
        self.layers_of = QLabel("layers", self)
        self.layers_of.setObjectName("studentLayersOf")
        self.about = QLabel(self)
        self.about.setObjectName("studentAbout")
        self.about.setWordWrap(True)
        self.error = ErrorLabel(self)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.whole)
        row.addSpacing(12)
        row.addWidget(self.pruned)
        row.addWidget(self.layers)
        row.addWidget(self.layers_of)
        row.addStretch(1)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(2)
        col.addLayout(row)
        col.addWidget(self.about)
        col.addWidget(self.error)
        self._syncing = False
        self._number_typed = False  # a person set the number: kept while "this model" is chosen
        self.whole.toggled.connect(self._toggled)
        self.pruned.toggled.connect(self._toggled)
        self.layers.valueChanged.connect(self._number_changed)
        state.subscribe(self._on_state)
        self.sync()

    # --- the model --------------------------------------------------------------------
    @property
    def model_layers(self) -> int:
        """The chosen model's layers (0 while not known)."""
        return int(getattr(self.state.model_info, "layers", 0) or 0)

    def _default_layers(self) -> int:
        """What "with N layers" offers until a person sets a number: half the model's layers (the usual student)."""
        return max(1, self.model_layers // 2)

    # --- a person's choice ------------------------------------------------------------
    def _toggled(self, on: bool) -> None:
        if on:  # the option now chosen (the other one's toggle off says nothing new)
            self._chosen()

    def _chosen(self) -> None:
        if self._syncing:
            return
        self.state.set(STUDENT_FIELD, str(self.layers.value()) if self.pruned.isChecked() else "0")

    def _number_changed(self, value: int) -> None:
        if self._syncing:
            return
        self._number_typed = True
        if not self.pruned.isChecked():
            self.pruned.setChecked(True)  # sets the field through _chosen
        else:
            self.state.set(STUDENT_FIELD, str(value))

    # --- the state --------------------------------------------------------------------
    def _on_state(self, topic: str) -> None:
        if topic in (f"values:{STUDENT_FIELD}", "values:*", "model"):
            self.sync()
        elif topic == "errors":
            self.error.show_error(self.state.errors.get(STUDENT_FIELD, ""))

    def sync(self) -> None:
        """The options, the number and its bounds, the sentence and the error as the state has them."""
        chosen = student_layers(self.state.values.get(STUDENT_FIELD, 0))
        total = self.model_layers
        self._syncing = True
        try:
            top = max(total - 1, chosen, 1) if total else MOST_LAYERS
            self.layers.setMaximum(top)  # a loaded config's number is shown as it is, with its error
            if chosen:
                self.layers.setValue(chosen)
            elif not self._number_typed or self.layers.value() > top:
                self.layers.setValue(self._default_layers())
            (self.pruned if chosen else self.whole).setChecked(True)
        finally:
            self._syncing = False
        self.layers_of.setText(f"of {total} layers" if total else "layers")
        self.about.setText(student_sentence(chosen, total))
        self.error.show_error(self.state.errors.get(STUDENT_FIELD, ""))
