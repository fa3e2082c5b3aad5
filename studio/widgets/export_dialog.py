"""Export, as the person sees it: progress with Cancel, then the check's verdict, the folder and "Open folder".

The dialog drives the engine's ``export`` command through an :class:`EngineJob` (never the engine itself).
``ExportOptions`` is the "Export as..." choice of place, checkpoint and formats; the one-click export uses
the defaults (the adapter, checked, in the data directory's ``exports/`` folder).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QApplication,
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

from finetune_studio.core import export_target
from finetune_studio.core.protocol.events import ExportResult, Progress
from finetune_studio.core.store import Store
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.state.run_labels import run_label
from finetune_studio.studio.widgets.wheel_guard import guard_wheel

GGUF_TYPES = ("f16", "q8_0", "q4_0")
QUIET_S = 5  # seconds without a progress event before the dialog shows it is still working


def in_app_words(message: str) -> str:
    """The engine's command-line advice in the dialog's words (its Replace it button is the CLI's --force)."""
    return message.replace("replace it (--force)", "press Replace it").replace("(--force)", "(Replace it)")


def check_notes(result: ExportResult) -> list[str]:
    """check.json's notes: what the check did not check, and why."""
    report = Path(result.report_file) if result.report_file else Path(result.path) / "check.json"
    try:
        notes = json.loads(report.read_text(encoding="utf-8")).get("notes") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in notes if n]


def stored_run_label(run_id: str) -> str:
    """The run's name (with "from <parent>"), read from the database; the id when it cannot be read."""
    try:
        store = Store()
    except (OSError, sqlite3.Error):  # a damaged or locked database: the id still names the run
        return run_id
    try:
        run = store.get_run(run_id)
        parent = store.get_run(run.parent_run_id) if run and run.parent_run_id else None
        return run_label(run, parent) if run else run_id
    except (OSError, sqlite3.Error, KeyError):
        return run_id
    finally:
        store.close()


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
        self.setWindowTitle(f"Export {stored_run_label(run_id)} as…")
        self.setToolTip(run_id)
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
        self.setObjectName("exportDialog")
        self.stage = QLabel("", self)
        self.stage.setObjectName("exportStage")
        self.stage.setWordWrap(True)
        self.bar = QProgressBar(self)
        self.bar.setObjectName("exportProgress")
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
        self.open_button.setObjectName("exportOpenFolder")
        self.open_button.clicked.connect(self.open_folder)
        self.copy_button = QPushButton("Copy path", self)
        self.copy_button.setObjectName("exportCopyPath")
        self.copy_button.clicked.connect(self.copy_path)
        self.copy_button.hide()
        self.open_url = QDesktopServices.openUrl  # False where no file manager is registered; tests swap it
        self.close_button = QPushButton("Close", self)
        self.close_button.setObjectName("exportClose")
        self.close_button.clicked.connect(self.hide)
        # a sign of life while a stage takes long (the reload check can take minutes without a progress event)
        self._alive = QTimer(self, interval=1000)
        self._alive.timeout.connect(self._tick)
        self._stage_text, self._quiet_s = "", 0
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for b in (self.cancel_button, self.replace_button, self.copy_button, self.open_button, self.close_button):
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
        label = stored_run_label(run_id)
        self.setWindowTitle(f"Export {label}")
        self.verdict.setText("")
        self.path.setText("")
        self.copy_button.hide()
        self.replace_button.hide()
        self.show()
        if self.options.out:  # a place the person chose: refuse at once, not after the engine has started
            try:
                export_target.check_target(self.options.out, force=self.options.force)
            except export_target.ExportTargetError as exc:
                self._failed(str(exc))
                return
        self.stage.setText(f"Exporting {label}…")
        self._stage_text, self._quiet_s = self.stage.text(), 0
        self.bar.setRange(0, 0)
        self._set_running(True)
        self._alive.start()
        self.job.run(*self.options.args(run_id))

    def cancel(self) -> None:
        if self.job.running:
            self.job.cancel()  # SIGTERM: the engine removes its temporary folder
            self._set_running(False)
            self.stage.setText("Cancelled; nothing was written.")

    def _tick(self) -> None:
        """Five seconds without news: the bar turns busy and the stage says how long it has been working."""
        self._quiet_s += 1
        if self._quiet_s >= QUIET_S and self.job.running:
            self.bar.setRange(0, 0)
            self.stage.setText(f"{self._stage_text} (working, {self._quiet_s} s)")

    def open_folder(self) -> None:
        """Open the export's folder in the file manager; where none is set up, say so and offer its path."""
        if self.result is None:
            return
        if not self.open_url(QUrl.fromLocalFile(self.result.path)):
            self.stage.setText("No file manager is set up to open folders here. The export is in the folder below:")
            self.copy_button.show()

    def copy_path(self) -> None:
        QApplication.clipboard().setText(self.path.text())
        self.copy_button.setText("Copied")

    def _replace(self) -> None:
        opts = self.options
        self.start(self.run_id, ExportOptions(opts.out, opts.checkpoint, opts.formats, opts.quants, force=True))

    def _set_running(self, running: bool) -> None:
        if not running:
            self._alive.stop()
        self.cancel_button.setVisible(running)
        self.close_button.setVisible(not running)
        self.open_button.setVisible(not running and self.result is not None)
        self.bar.setVisible(running)

    def _progress(self, event: Progress) -> None:
        self.bar.setRange(0, max(event.total, 1))
        self.bar.setValue(event.done)
        self._stage_text, self._quiet_s = event.message or event.stage, 0
        self.stage.setText(self._stage_text)

    def _done(self, result) -> None:
        if not isinstance(result, ExportResult):
            self._failed("The engine gave no export result.")
            return
        self.result = result
        self.stage.setText("Export written and checked." if result.passed else "Export written, but the check FAILED.")
        text = result.verdict
        if "ollama" in result.formats:
            modelfile = Path(result.path) / "gguf" / "Modelfile"
            text += (
                f"\nOllama: the Modelfile was written beside the GGUF (the check reloads the GGUF; the Modelfile needs "
                f"Ollama itself). Create the model with: ollama create NAME -f {modelfile}"
            )
        notes = check_notes(result)
        if notes:
            text += "\n\nNot checked, and why:\n" + "\n".join(f"• {n}" for n in notes)
        text += f"\n\nSample answer: {result.sample!r}" if result.sample else ""
        self.verdict.setText(text)
        self.path.setText(result.path)
        self._set_running(False)

    def _failed(self, message: str) -> None:
        self.result = None
        self._set_running(False)
        self.stage.setText("Export not written.")
        self.verdict.setText(in_app_words(message))
        self.replace_button.setVisible("holds a previous export" in message and not self.options.force)
