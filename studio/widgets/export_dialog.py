"""Export, as the person sees it: progress with Cancel, then the check's verdict, the folder and "Open folder".

The dialog drives the engine's ``export`` command through an :class:`EngineJob` (never the engine itself).
``ExportOptions`` is the "Export as..." choice of place, checkpoint and formats; the one-click export uses
the defaults (the adapter, checked, in the data directory's ``exports/`` folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.protocol.events import ExportResult, Progress
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.widgets.wheel_guard import guard_wheel

GGUF_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class ExportOptions:
    out: str = ""  # empty: the default place
    checkpoint: str = ""  # empty: final (or newest); "best"; a step
    formats: tuple[str, ...] = ("adapter",)
    quants: tuple[str, ...] = ("q8_0",)
    force: bool = False

    def args(self, run_id: str) -> list[str]:
        out = ["export", run_id] + ([self.out] if self.out else [])
        out += [a for f in self.formats if f != "adapter" for a in ("--format", f)]
        if "gguf" in self.formats or "ollama" in self.formats:
            out += ["--quant", ",".join(self.quants)]
        if self.checkpoint:
            out += ["--checkpoint", self.checkpoint]
        return out + (["--force"] if self.force else [])


def checkpoint_steps(run_dir: str) -> list[int]:
    root = Path(run_dir or "") / "checkpoints"
    if not run_dir or not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


class ExportOptionsDialog(QDialog):
    """Export as...: place, checkpoint and formats."""

    def __init__(self, run_id: str, run_dir: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(f"Export {run_id} as…")
        self.place = QLineEdit(self)
        self.place.setPlaceholderText("exports/ in the studio's data folder")
        browse = QPushButton("Choose…", self)
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.place, 1)
        row.addWidget(browse)
        self.checkpoint = QComboBox(self)
        self.checkpoint.addItem("Final adapter (or the newest checkpoint)", "")
        self.checkpoint.addItem("Best checkpoint (lowest eval loss)", "best")
        for step in checkpoint_steps(run_dir):
            self.checkpoint.addItem(f"Checkpoint at step {step}", str(step))
        self.merged = QCheckBox("Merged model (16-bit safetensors)", self)
        self.gguf = QCheckBox("GGUF (llama.cpp)", self)
        self.ollama = QCheckBox("Ollama Modelfile (with the GGUF)", self)
        self.quants = {q: QCheckBox(q, self) for q in GGUF_TYPES}
        self.quants["q8_0"].setChecked(True)
        quant_row = QHBoxLayout()
        for box in self.quants.values():
            quant_row.addWidget(box)
        form = QFormLayout()
        form.addRow("Folder", row)
        form.addRow("Checkpoint", self.checkpoint)
        adapter = QCheckBox("PEFT adapter with model card (always)", self)
        adapter.setChecked(True)
        adapter.setEnabled(False)
        form.addRow("Formats", adapter)
        form.addRow("", self.merged)
        form.addRow("", self.gguf)
        form.addRow("", self.ollama)
        form.addRow("GGUF types", quant_row)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(buttons)
        guard_wheel(self)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into (a new folder is made inside)")
        if folder:
            self.place.setText(str(Path(folder) / "export"))

    def options(self) -> ExportOptions:
        formats = ["adapter"] + [
            name
            for name, box in (("merged", self.merged), ("gguf", self.gguf), ("ollama", self.ollama))
            if box.isChecked()
        ]
        quants = tuple(q for q, box in self.quants.items() if box.isChecked()) or ("q8_0",)
        return ExportOptions(
            out=self.place.text().strip(),
            checkpoint=self.checkpoint.currentData(),
            formats=tuple(formats),
            quants=quants,
        )


class ExportDialog(QDialog):
    """One export: progress and Cancel while it runs; then the verdict, the path and Open folder."""

    def __init__(self, job: EngineJob, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export")
        self.setMinimumWidth(520)
        self.job = job
        self.job.graceful = True
        self.run_id = ""
        self.options = ExportOptions()
        self.result: ExportResult | None = None  # type: ignore[assignment]
        self.stage = QLabel("", self)
        self.stage.setWordWrap(True)
        self.bar = QProgressBar(self)
        self.verdict = QLabel("", self)
        self.verdict.setObjectName("exportVerdict")
        self.verdict.setWordWrap(True)
        self.verdict.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.path = QLabel("", self)
        self.path.setObjectName("exportPath")
        self.path.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.clicked.connect(self.cancel)
        self.replace_button = QPushButton("Replace it", self)
        self.replace_button.setToolTip("Replace the previous export in that folder")
        self.replace_button.clicked.connect(self._replace)
        self.open_button = QPushButton("Open folder", self)
        self.open_button.clicked.connect(self.open_folder)
        self.close_button = QPushButton("Close", self)
        self.close_button.clicked.connect(self.hide)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for b in (self.cancel_button, self.replace_button, self.open_button, self.close_button):
            buttons.addWidget(b)
        lay = QVBoxLayout(self)
        for w in (self.stage, self.bar, self.verdict, self.path):
            lay.addWidget(w)
        lay.addLayout(buttons)
        job.progress.connect(self._progress)
        job.done.connect(self._done)
        job.failed.connect(self._failed)
        self._set_running(False)

    def start(self, run_id: str, options: ExportOptions | None = None) -> None:
        self.run_id, self.options, self.result = run_id, options or ExportOptions(), None
        self.verdict.setText("")
        self.path.setText("")
        self.stage.setText(f"Exporting {run_id}…")
        self.bar.setRange(0, 0)
        self._set_running(True)
        self.replace_button.hide()
        self.job.run(*self.options.args(run_id))
        self.show()

    def cancel(self) -> None:
        if self.job.running:
            self.job.cancel()  # SIGTERM: the engine removes its temporary folder
            self.stage.setText("Cancelled; nothing was written.")
            self._set_running(False)

    def open_folder(self) -> None:
        if self.result is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.result.path))

    def _replace(self) -> None:
        opts = self.options
        self.start(self.run_id, ExportOptions(opts.out, opts.checkpoint, opts.formats, opts.quants, force=True))

    def _set_running(self, running: bool) -> None:
        self.cancel_button.setVisible(running)
        self.close_button.setVisible(not running)
        self.open_button.setVisible(not running and self.result is not None)
        self.bar.setVisible(running)

    def _progress(self, event: Progress) -> None:
        self.bar.setRange(0, max(event.total, 1))
        self.bar.setValue(event.done)
        self.stage.setText(event.message)

    def _done(self, result) -> None:
        if not isinstance(result, ExportResult):
            self._failed("The engine gave no export result.")
            return
        self.result = result
        self.stage.setText("Export written and checked." if result.passed else "Export written, but the check FAILED.")
        text = result.verdict + (f"\n\nSample answer: {result.sample!r}" if result.sample else "")
        self.verdict.setText(text)
        self.path.setText(result.path)
        self._set_running(False)

    def _failed(self, message: str) -> None:
        self.result = None
        self.stage.setText("Export not written.")
        self.verdict.setText(message)
        self._set_running(False)
        self.replace_button.setVisible("holds a previous export" in message and not self.options.force)
