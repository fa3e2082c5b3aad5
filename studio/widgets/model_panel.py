"""Choose the model: the bundled default, a local folder, a GGUF file or a cached hub id; show its shape."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.memory import estimate as memory
from finetune_studio.core.protocol.events import ModelReady, Progress
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.state.model_info import describe_folder, format_count, local_folder
from finetune_studio.studio.state.setup import HELP, SetupState
from finetune_studio.studio.widgets.config_form import ErrorLabel

FACTS = (
    ("architecture", "Architecture"),
    ("parameters", "Parameters"),
    ("layers", "Layers"),
    ("hidden_size", "Hidden size"),
    ("vocab_size", "Vocabulary"),
    ("context_length", "Context length"),
    ("dtype", "Weights dtype"),
)


class ModelPanel(QGroupBox):
    def __init__(self, state: SetupState, recent: list[str] | None = None, parent: QWidget | None = None):
        super().__init__("Model", parent)
        self.state = state
        self.job = EngineJob(self)
        self.job.progress.connect(self._on_progress)
        self.job.done.connect(self._on_info)
        self.job.failed.connect(self._on_failed)
        self.looking_up = False  # the engine is describing the model: its message is news, not an error
        self.choice = QComboBox(self)
        self.choice.setObjectName("modelChoice")
        self.choice.setEditable(True)
        self.choice.setToolTip(HELP["model"]["help"])
        self.choice.addItem("default")
        for spec in recent or []:
            if spec and self.choice.findText(spec) < 0:
                self.choice.addItem(spec)
        self.choice.setCurrentText(str(state.values["model"]))
        line_edit = self.choice.lineEdit()
        assert line_edit is not None
        line_edit.setPlaceholderText("default, a folder, a .gguf file or an org/name hub id")
        self.choice.activated.connect(lambda _i: self._chosen(self.choice.currentText()))
        line_edit.editingFinished.connect(lambda: self._chosen(self.choice.currentText()))
        folder_btn = QPushButton("Folder…", self)
        folder_btn.clicked.connect(self._pick_folder)
        gguf_btn = QPushButton("GGUF…", self)
        gguf_btn.clicked.connect(self._pick_gguf)
        row = QHBoxLayout()
        row.addWidget(self.choice, 1)
        row.addWidget(folder_btn)
        row.addWidget(gguf_btn)
        self.progress = QProgressBar(self)
        self.progress.hide()
        self.message = ErrorLabel(self)
        self.busy_note = QLabel(self)  # "Looking up the model…", in the ordinary text colour
        self.busy_note.setObjectName("modelBusy")
        self.busy_note.setWordWrap(True)
        self.busy_note.hide()
        self.facts: dict[str, QLabel] = {}
        grid = QFormLayout()
        for key, label in FACTS:
            self.facts[key] = QLabel("–", self)
            self.facts[key].setObjectName(f"fact_{key}")
            grid.addRow(label, self.facts[key])
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.message)
        lay.addWidget(self.busy_note)
        lay.addLayout(grid)
        self._debounce = QTimer(self, singleShot=True, interval=300)
        self._debounce.timeout.connect(self.resolve)
        # Parameters counted by the engine (on the meta device) for models the formula does not know,
        # cached per (folder, method, rank, targets): the memory estimate then uses exact counts.
        self.counts: dict[tuple[str, str], ModelReady] = {}
        self.count_job = EngineJob(self)
        self.count_job.done.connect(self._on_counts)
        self.count_job.failed.connect(lambda _msg: None)  # the estimate keeps the formula
        self._count_debounce = QTimer(self, singleShot=True, interval=500)
        self._count_debounce.timeout.connect(self.count_parameters)
        state.subscribe(self._on_state)
        self._show()

    # --- choosing ------------------------------------------------------------------
    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (with config.json)")
        if folder:
            self._chosen(folder)

    def _pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "GGUF model file", "", "GGUF models (*.gguf)")
        if path:
            self._chosen(path)

    def _chosen(self, spec: str) -> None:
        spec = spec.strip()
        if self.choice.currentText() != spec:
            self.choice.setCurrentText(spec)
        self.state.set("model", spec)

    def _on_state(self, topic: str) -> None:
        if topic in ("values:model", "values:*"):
            if self.choice.currentText() != self.state.values["model"]:
                self.choice.setCurrentText(str(self.state.values["model"]))
            self._debounce.start()
        elif topic == "model":
            self._show()
            self._count_debounce.start()
        elif topic in ("values:method", "values:lora_rank", "values:target_modules"):
            self._count_debounce.start()

    # --- exact parameter counts ------------------------------------------------------
    def _adapters(self) -> TrainConfig | None:
        """The method, rank and targets chosen (the rest of the form need not be valid yet)."""
        values, errors = self.state.typed_values()
        names = ("method", "lora_rank", "target_modules")
        if any(n in errors for n in names):
            return None
        try:
            return TrainConfig.from_dict({n: values[n] for n in names})
        except ConfigError:
            return None

    def _counts_wanted(self) -> tuple[str, str] | None:
        """(folder, key) when the model's folder is known, the formula cannot count it and the adapters are valid."""
        info, config = self.state.model_info, self._adapters()
        path = getattr(info, "path", "")
        if not path or config is None or not (Path(path) / "config.json").is_file():
            return None
        try:
            if memory.ModelShape.from_model_dir(path).formula_counts_exactly:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path, memory.counts_key(config)

    def count_parameters(self) -> None:
        wanted = self._counts_wanted()
        if wanted is None or getattr(self.state.model_info, "counted_for", "") == wanted[1]:
            return
        if wanted in self.counts:
            self._apply_counts(self.counts[wanted])
            return
        config = self._adapters()
        assert config is not None
        self.count_job.run(
            "model",
            "info",
            wanted[0],
            "--method",
            config.method,
            "--lora-rank",
            str(config.lora_rank),
            "--target-modules",
            ",".join(config.target_modules),
        )

    def _on_counts(self, result) -> None:
        if isinstance(result, ModelReady) and result.counted_for:
            self.counts[(result.path, result.counted_for)] = result
            self._apply_counts(result)
            self._count_debounce.start()  # the settings may have changed meanwhile

    def _apply_counts(self, counted: ModelReady) -> None:
        info = self.state.model_info
        if info is None or Path(info.path).resolve() != Path(counted.path).resolve():
            return
        fields = ("total_params", "trainable_params", "quantizable_params", "optimizer_8bit_bytes", "counted_for")
        self.state.set_model_info(dataclasses.replace(info, **{f: getattr(counted, f) for f in fields}))

    # --- resolving -----------------------------------------------------------------
    def resolve(self) -> None:
        """Facts for the chosen model: read at once when it is a local folder, else asked of the engine."""
        spec = str(self.state.values["model"]).strip()
        if not spec:
            self.job.cancel()
            self.looking_up = False
            self.state.set_model_info(None, "Choose a model.")
            return
        folder = local_folder(spec)
        if folder is not None:
            self.job.cancel()
            self.looking_up = False
            try:
                info = describe_folder(folder, name=Path(spec).name if spec != "default" else "SmolLM2-135M-Instruct")
            except (OSError, ValueError) as exc:
                self.state.set_model_info(None, f"Cannot read {folder / 'config.json'}: {exc}")
                return
            self.state.set_model_info(info)
            return
        self.looking_up = True
        self.state.set_model_info(
            None,
            "Looking up the model… The first time, it is prepared once (fetched or converted) and cached; later "
            "starts are quick."
            if not spec.lower().endswith(".gguf")
            else "Importing the GGUF file: it is converted once, then cached; later starts are quick.",
        )
        self.progress.setRange(0, 0)
        self.progress.show()
        self.job.run("model", "info", spec)

    def _on_progress(self, ev: Progress) -> None:
        self.progress.setRange(0, max(ev.total, 0))
        self.progress.setValue(ev.done)
        self.progress.setFormat(ev.message or ev.stage)
        self.progress.show()

    def _on_failed(self, message: str) -> None:
        self.looking_up = False
        self.progress.hide()
        self.state.set_model_info(None, message)

    def _on_info(self, result) -> None:
        self.looking_up = False
        self.progress.hide()
        if isinstance(result, ModelReady):
            self.state.set_model_info(result)
        else:
            self.state.set_model_info(None, "The engine did not describe the model.")

    def _show(self) -> None:
        info = self.state.model_info
        if info is not None:
            self.progress.hide()
        busy = info is None and self.looking_up
        self.message.show_error(self.state.model_message if info is None and not busy else "")
        self.busy_note.setText(self.state.model_message if busy else "")
        self.busy_note.setVisible(busy and bool(self.state.model_message))
        for key, label in self.facts.items():
            value = getattr(info, key, None) if info is not None else None
            if key == "parameters":
                text = format_count(value or 0)
            elif key in ("layers", "hidden_size", "vocab_size", "context_length"):
                text = f"{value:,}" if value else "–"
            else:
                text = str(value) if value else "–"
            label.setText(text)
