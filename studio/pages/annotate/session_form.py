"""The session form: what a labelling session asks for (its name, the prompts, the two models that answer, sampling,
the annotator) and the generation's progress.

Prompts are data: typed ones are read one per line (or as JSONL rows) when a new session is made; a dataset's prompts
and a reopened session's are kept exactly as they are (newlines inside a prompt included) and shown read-only with
their count, never re-read from the text box.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.protocol.generation import WEIGHTS, Weights
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.generation_weights import default_weights, weights_options

BASE_LABEL = "Base model (adapters off)"
PROMPTS_HINT = "Prompts, one per line (or JSONL rows); answers are not needed"
SEPARATOR = "───── {} ─────"


class SideBox(QGroupBox):
    """One of the two models that answer: the base model, or a run's adapter (a checkpoint of it), and a seed."""

    def __init__(self, title: str, seed: int, parent: QWidget | None = None):
        super().__init__(title, parent)
        self.adapter = QComboBox(self)
        self.adapter.setEditable(True)
        self.adapter.setToolTip("The base model, a run (its final adapter) or an adapter folder")
        self.adapter.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.adapter.setMinimumContentsLength(14)
        self.checkpoint = QLineEdit(self)
        self.checkpoint.setPlaceholderText("final adapter")
        self.checkpoint.setToolTip("A checkpoint step of the run (empty: its final adapter)")
        self.seed = QSpinBox(self)
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(seed)
        form = QFormLayout(self)
        form.addRow("Adapter", self.adapter)
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Seed", self.seed)
        self.set_runs([])

    def set_runs(self, runs: list[str] | list[tuple[str, str]]) -> None:
        """``runs``: the runs with an adapter, as ids or (id, name); shown by name, the id in the tooltip."""
        current = self.adapter_value()
        self.adapter.clear()
        self.adapter.addItem(BASE_LABEL, "")
        for run in runs:
            rid, name = (run, "") if isinstance(run, str) else run
            self.adapter.addItem(name or rid, rid)
            self.adapter.setItemData(self.adapter.count() - 1, f"run {rid}", Qt.ItemDataRole.ToolTipRole)
        if current:
            self.show_adapter(current)

    def adapter_value(self) -> str:
        """The run id or adapter folder chosen ('' for the base model): a listed run's id, or the text typed."""
        text = self.adapter.currentText().strip()
        index = self.adapter.findText(text)
        if index >= 0:
            return str(self.adapter.itemData(index) or "")
        return "" if text == BASE_LABEL else text

    def show_adapter(self, adapter: str) -> None:
        index = self.adapter.findData(adapter) if adapter else 0
        if index >= 0:
            self.adapter.setCurrentIndex(index)
        else:
            self.adapter.setEditText(adapter)

    def side(self, model: str) -> an.Side:
        adapter = self.adapter_value()
        step = self.checkpoint.text().strip()
        if step and not step.isdigit():
            raise ValueError(f"checkpoint: a step number, not {step!r}")
        return an.Side(model=model, adapter=adapter, checkpoint=int(step) if step else None, seed=self.seed.value())

    def show_side(self, side: an.Side) -> None:
        self.show_adapter(side.adapter)
        self.checkpoint.setText("" if side.checkpoint is None else str(side.checkpoint))
        self.seed.setValue(side.seed)


class SessionForm(QWidget):
    """The left side of Annotate: the session's fields scroll (rather than widen or lengthen the window); Generate,
    Stop and the generation's progress stay in view below them."""

    open_requested = Signal(str)  # a session's name
    generate_requested = Signal()
    stop_requested = Signal()
    annotator_changed = Signal(str)
    prompts_file_chosen = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("sessionForm")
        self.fields = QScrollArea(self)
        self.fields.setWidgetResizable(True)
        self.fields.setFrameShape(QScrollArea.Shape.NoFrame)
        self.fields.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        body = QWidget(self.fields)
        self.locked_prompts: list[str] | None = None  # a dataset's or a reopened session's prompts, as they are
        self.session_name = QLineEdit("session-1", body)
        self.session_name.setObjectName("sessionName")
        self.sessions = QComboBox(body)
        self.sessions.setObjectName("sessionList")
        self.sessions.setToolTip("Reopen an earlier session: it continues where it stopped")
        self.sessions.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.sessions.setMinimumContentsLength(10)
        self.open_button = QPushButton("Open", body)
        self.open_button.setObjectName("openSession")
        self.open_button.clicked.connect(lambda: self.open_requested.emit(self.sessions.currentText()))
        self.model = QLineEdit(body)
        self.model.setObjectName("sessionModel")
        self.model.setPlaceholderText("default")
        self.prompts = QPlainTextEdit(body)
        self.prompts.setObjectName("sessionPrompts")
        self.prompts.setPlaceholderText(PROMPTS_HINT)
        self.prompts.setMinimumHeight(90)
        self.prompts_count = QLabel(body)
        self.prompts_count.setObjectName("promptsCount")
        self.prompts_count.setWordWrap(True)
        self.load_prompts_button = QPushButton("Prompts from a dataset…", body)
        self.load_prompts_button.setObjectName("loadPrompts")
        self.new_prompts_button = QPushButton("Type new prompts", body)
        self.new_prompts_button.setObjectName("newPrompts")
        self.new_prompts_button.setToolTip("Empty the prompts to type your own (for a new session)")
        self.new_prompts_button.clicked.connect(self.unlock_prompts)
        self.side_a, self.side_b = SideBox("Model 1", 1, body), SideBox("Model 2", 2, body)
        self.side_a.setObjectName("model1Box")
        self.side_b.setObjectName("model2Box")
        self.pairs_per_prompt = QSpinBox(body)
        self.pairs_per_prompt.setObjectName("pairsPerPrompt")
        self.pairs_per_prompt.setRange(1, 3)
        self.pairs_per_prompt.setSuffix(" pair(s)")
        self.pairs_per_prompt.setToolTip("Pairs per prompt: 1 to 3 (2 to 6 answers, half from each model)")
        self.temperature = QDoubleSpinBox(body)
        self.temperature.setRange(0, 2)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.8)
        self.top_p = QDoubleSpinBox(body)
        self.top_p.setRange(0.01, 1)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(0.95)
        self.max_new_tokens = QSpinBox(body)
        self.max_new_tokens.setObjectName("maxNewTokens")
        self.max_new_tokens.setRange(1, 4096)
        self.max_new_tokens.setValue(128)
        self.weights = QComboBox(body)  # what the worker decodes with: full, int8 or int4, each with its cost
        self.weights.setObjectName("generationWeights")
        self.weights_detail = QLabel(body)
        self.weights_detail.setObjectName("weightsDetail")
        self.weights_detail.setWordWrap(True)
        self.weights.currentIndexChanged.connect(self._show_weights_detail)
        self.model.editingFinished.connect(self.refresh_weights)
        self.refresh_weights()
        self.annotator = QLineEdit(body)
        self.annotator.setObjectName("annotatorName")
        self.annotator.setPlaceholderText("your name (optional)")
        self.annotator.setToolTip("Decisions are stored under this name; change it at any time")
        self.annotator.editingFinished.connect(lambda: self.annotator_changed.emit(self.annotator.text().strip()))
        self.generate_button = QPushButton("Generate", self)
        self.generate_button.setObjectName("generateButton")
        self.generate_button.setToolTip("Save the session and generate the answers it still lacks")
        self.generate_button.clicked.connect(self.generate_requested.emit)
        self.stop_button = QPushButton("Stop", self)
        self.stop_button.setObjectName("stopGenerating")
        self.stop_button.clicked.connect(self.stop_requested.emit)
        self.stop_button.setEnabled(False)
        self.gen_progress = QProgressBar(self)
        self.gen_progress.setObjectName("generationProgress")
        self.stream_head = QLabel(self)
        self.stream_head.setWordWrap(True)
        self.stream = QPlainTextEdit(self)
        self.stream.setReadOnly(True)
        self.stream.setMaximumHeight(64)
        self.status = QLabel(self)
        self.status.setObjectName("annotateStatus")
        self.status.setWordWrap(True)
        form = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.sessions, 1)
        row.addWidget(self.open_button)
        form.addRow("Reopen", row)
        form.addRow("Session", self.session_name)
        form.addRow("Annotator", self.annotator)
        form.addRow("Base model", self.model)
        form.addRow("Answers", self.pairs_per_prompt)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Weights", self.weights)
        form.addRow("", self.weights_detail)
        prompt_buttons = QHBoxLayout()
        prompt_buttons.addWidget(self.load_prompts_button)
        prompt_buttons.addWidget(self.new_prompts_button)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        col = QVBoxLayout(body)
        col.addLayout(form)
        col.addWidget(self.prompts, 1)
        col.addWidget(self.prompts_count)
        col.addLayout(prompt_buttons)
        col.addWidget(self.side_a)
        col.addWidget(self.side_b)
        self.fields.setWidget(body)
        self.fields.setMinimumWidth(body.minimumSizeHint().width() + self.fields.verticalScrollBar().sizeHint().width())
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.fields, 1)
        outer.addLayout(buttons)
        outer.addWidget(self.gen_progress)
        outer.addWidget(self.stream_head)
        outer.addWidget(self.stream)
        outer.addWidget(self.status)
        self._show_prompts_mode()

    # --- prompts --------------------------------------------------------------------
    def refresh_weights(self) -> None:
        """The weights options for the model typed, each with its measured cost; the default chosen (the fastest that
        keeps the answers), a choice the person made kept where the new model offers it."""
        model = self.model.text().strip() or "default"
        chosen = self.weights.currentData() if self.weights.count() else None
        self.weights.blockSignals(True)
        self.weights.clear()
        for option in weights_options(model):
            self.weights.addItem(option.label, option.weights)
            self.weights.setItemData(self.weights.count() - 1, option.detail, Qt.ItemDataRole.ToolTipRole)
        keep = self.weights.findData(chosen) if chosen else -1
        self.weights.setCurrentIndex(keep if keep >= 0 else max(0, self.weights.findData(default_weights(model))))
        self.weights.blockSignals(False)
        self._show_weights_detail()

    def _show_weights_detail(self) -> None:
        self.weights_detail.setText(str(self.weights.currentData(Qt.ItemDataRole.ToolTipRole) or ""))

    def weights_value(self) -> Weights:
        """The weights the worker is to decode with (``full``, ``int8`` or ``int4``)."""
        chosen = self.weights.currentData()
        return cast(Weights, chosen) if chosen in WEIGHTS else "full"

    def set_prompts(self, prompts: list[str], where: str) -> None:
        """Show ``prompts`` read-only, exactly as they are; they are the session's until 'Type new prompts'."""
        self.locked_prompts = list(prompts)
        blocks = [f"{SEPARATOR.format(i + 1)}\n{p}" for i, p in enumerate(prompts)]
        self.prompts.setPlainText("\n".join(blocks))
        self._where = where
        self._show_prompts_mode()

    def unlock_prompts(self) -> None:
        self.locked_prompts = None
        self.prompts.clear()
        self._show_prompts_mode()
        self.prompts.setFocus()

    def _show_prompts_mode(self) -> None:
        locked = self.locked_prompts is not None
        self.prompts.setReadOnly(locked)
        self.new_prompts_button.setVisible(locked)
        if locked:
            assert self.locked_prompts is not None
            self.prompts_count.setText(f"{an.plural(len(self.locked_prompts), 'prompt')} {self._where} (read-only).")
        else:
            self.prompts_count.setText("One prompt per line, or JSONL rows with a 'prompt' or 'messages'.")

    def prompt_list(self) -> list[str]:
        if self.locked_prompts is not None:
            return list(self.locked_prompts)
        return an.prompts_from_text(self.prompts.toPlainText())

    # --- the session ----------------------------------------------------------------
    def spec(self) -> an.SessionSpec:
        """The session the form describes (raises ValueError with a message a person can act on)."""
        model = self.model.text().strip() or "default"
        return an.SessionSpec(
            name=self.session_name.text(),
            prompts=self.prompt_list(),
            side_a=self.side_a.side(model),
            side_b=self.side_b.side(model),
            sampling=an.Sampling(
                temperature=self.temperature.value(),
                top_p=self.top_p.value(),
                max_new_tokens=self.max_new_tokens.value(),
            ),
            pairs_per_prompt=self.pairs_per_prompt.value(),
            annotator=self.annotator.text().strip(),
        )

    def show_spec(self, spec: an.SessionSpec) -> None:
        self.session_name.setText(spec.name)
        self.set_prompts(spec.prompts, f"in session {spec.name!r}")
        self.model.setText(spec.side_a.model)
        self.side_a.show_side(spec.side_a)
        self.side_b.show_side(spec.side_b)
        self.pairs_per_prompt.setValue(spec.pairs_per_prompt)
        self.temperature.setValue(spec.sampling.temperature)
        self.top_p.setValue(spec.sampling.top_p)
        self.max_new_tokens.setValue(spec.sampling.max_new_tokens)
        self.annotator.setText(spec.annotator)

    def set_sessions(self, names: list[str]) -> None:
        current = self.sessions.currentText()
        self.sessions.clear()
        self.sessions.addItems(names)
        if current:
            self.sessions.setCurrentText(current)

    def load_prompts_file(self, path: str) -> str:
        """The prompts of a dataset file, kept as they are; returns what to tell the person."""
        try:
            prompts = an.prompts_from_file(path)
        except ValueError as exc:
            return str(exc)
        self.set_prompts(prompts, f"from {Path(path).name}")
        return f"{an.plural(len(prompts), 'prompt')} from {Path(path).name} (answers left out)."

    def set_generating(self, running: bool) -> None:
        self.generate_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
