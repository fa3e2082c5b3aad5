"""The Runs page's "Methods lab…": every chosen PEFT method on one dataset and step budget, side by side.

The dialog runs the engine's ``methods --json`` command through an :class:`EngineJob` (never the engine itself):
each method trains as a run of its own in the store, so the runs overlay in Runs once it is done. The methods and
their one sentence each come from :mod:`core.methods`; the table is the ``methods_lab_report``
(:mod:`core.protocol.methods_lab`).
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core import methods
from finetune_studio.core.protocol.events import Event, Progress
from finetune_studio.core.protocol.methods_lab import MethodRow, MethodsLabReport
from finetune_studio.studio.services.jobs import EngineJob

COLUMNS = ("Method", "Trainable", "MiB above model (est / measured)", "Tokens/s", "Time s", "Loss", "Held-out", "Exact")
DEFAULT_CHOSEN: tuple[str, ...] = ("lora", "dora", "vera", "ia3", "bitfit", "prompt_tuning", "p_tuning")
DEFAULT_CHOSEN += ("prefix_tuning", "houlsby", "pfeiffer")


def row_cells(row: MethodRow) -> list[str]:
    """A report row as the table's cells; a refused or failed method says why in the second cell."""
    label = methods.BY_NAME[row.method].label if row.method in methods.BY_NAME else row.method
    if row.status != "completed":
        return [label, f"{row.status}: {row.message}"] + [""] * (len(COLUMNS) - 2)
    mib = f"{row.estimated_bytes / 2**20:.1f} / {row.measured_bytes / 2**20:.1f}"
    loss = f"{row.final_loss:.3f}" if row.final_loss is not None else ""
    held = f"{row.eval_loss:.3f}" if row.eval_loss is not None else ""
    exact = f"{row.exact:.0%}" if row.exact is not None else ""
    return [label, f"{row.trainable_params:,}", mib, f"{row.tokens_per_s:.0f}", f"{row.seconds:.0f}", loss, held, exact]


class MethodsLabDialog(QDialog):
    finished_report = Signal(object)  # MethodsLabReport: its runs are in the store now

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Methods lab")
        self.setObjectName("methodsLab")
        self.job = EngineJob(self)
        self.job.progress.connect(self._progress)
        self.job.done.connect(self._done)
        self.job.failed.connect(self._failed)
        self.methods = QListWidget(self)
        self.methods.setObjectName("labMethods")
        for m in methods.TABLE:
            if m.base_4bit:
                continue  # the lab compares on one 16-bit base
            item = QListWidgetItem(m.label, self.methods)
            item.setData(Qt.ItemDataRole.UserRole, m.name)
            item.setToolTip(m.summary)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if m.name in DEFAULT_CHOSEN else Qt.CheckState.Unchecked)
        self.dataset = QLineEdit(self)
        self.dataset.setObjectName("labDataset")
        self.dataset.setPlaceholderText("the demo task (scored by exact match)")
        self.steps = QSpinBox(self)
        self.steps.setObjectName("labSteps")
        self.steps.setRange(1, 100_000)
        self.steps.setValue(20)
        self.start_button = QPushButton("Train each", self)
        self.start_button.setObjectName("labStart")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel("Each method trains as a run of its own; the runs overlay in Runs.", self)
        self.status.setObjectName("labStatus")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setObjectName("labTable")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().hide()
        form = QFormLayout()
        form.addRow("Methods", self.methods)
        form.addRow("Dataset", self.dataset)
        form.addRow("Steps each", self.steps)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)

    def chosen(self) -> list[str]:
        items = [self.methods.item(i) for i in range(self.methods.count())]
        return [str(it.data(Qt.ItemDataRole.UserRole)) for it in items if it.checkState() == Qt.CheckState.Checked]

    def arguments(self) -> list[str]:
        """The engine's ``methods`` arguments for what the dialog shows."""
        args = ["methods", "--json", "--methods", ",".join(self.chosen()), "--steps", str(self.steps.value())]
        if self.dataset.text().strip():
            args += ["--dataset", self.dataset.text().strip()]
        return args

    def start(self) -> None:
        if not self.chosen():
            self.status.setText("Choose at least one method.")
            return
        self.table.setRowCount(0)
        self.start_button.setEnabled(False)
        self.status.setText(f"Training {len(self.chosen())} methods, {self.steps.value()} steps each…")
        self.job.run(*self.arguments())

    def cancel(self) -> None:
        if self.job.running:
            self.job.cancel()
            self.status.setText("Cancelled; the runs finished so far are in Runs.")
            self.start_button.setEnabled(True)
        else:
            self.reject()

    def _progress(self, event: Progress) -> None:
        self.status.setText(f"{event.message} ({event.done + 1} of {event.total})…")

    def _done(self, event: Event) -> None:
        self.start_button.setEnabled(True)
        if not isinstance(event, MethodsLabReport):
            self._failed(f"The engine answered {event.type}, not a methods lab report")
            return
        self.show_report(event)
        self.finished_report.emit(event)

    def _failed(self, message: str) -> None:
        self.start_button.setEnabled(True)
        self.status.setText(f"The lab failed: {message}")

    def show_report(self, report: MethodsLabReport) -> None:
        self.table.setRowCount(len(report.rows))
        for r, row in enumerate(report.rows):
            for c, text in enumerate(row_cells(row)):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        done = sum(1 for row in report.rows if row.status == "completed")
        where = "the demo task" if report.scorer else report.dataset
        self.status.setText(f"{done} of {len(report.rows)} methods trained on {where}, {report.steps} steps each.")
