"""Runs: every run from the database; filter, sort, overlay loss curves, open, start again, export; a distillation's
student timed beside its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.config import ConfigError
from finetune_studio.core.run_status import RUN_STATUSES, is_exportable, is_resumable
from finetune_studio.core.store import RunRecord, Store
from finetune_studio.studio.state.distill import is_distill, speed_details, speed_line
from finetune_studio.studio.state.series import Ema
from finetune_studio.studio.widgets.charts import Chart, make_curve
from finetune_studio.studio.widgets.flow_layout import FlowLayout
from finetune_studio.studio.widgets.methods_lab_dialog import MethodsLabDialog
from finetune_studio.studio.widgets.runs_model import COLUMNS, RUN_ID_ROLE, RunsFilter, RunsModel, earlier_sessions
from finetune_studio.studio.widgets.slurm_dialog import ask_slurm_options, save_slurm_script
from finetune_studio.studio.widgets.wheel_guard import guard_wheel

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
MAX_OVERLAY = 10


class RunsPage(QWidget):
    open_requested = Signal(str)
    new_from_config = Signal(dict)
    resume_requested = Signal(str)
    export_requested = Signal(str)  # one click: the adapter, checked, in the default place
    export_as_requested = Signal(str)  # choose place, checkpoint and formats
    message = Signal(str)  # for the status bar

    def __init__(self, store_factory=Store, parent: QWidget | None = None):
        super().__init__(parent)
        self._store_factory = store_factory
        self._store: Store | None = None
        self.model = RunsModel(self)
        self.proxy = RunsFilter(self)
        self.proxy.setSourceModel(self.model)
        self.filter_edit = QLineEdit(self)
        self.filter_edit.setObjectName("runsFilter")
        self.filter_edit.setPlaceholderText("Filter runs (name, model, dataset, method…)")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(lambda t: self.proxy.set_filter(text=t))
        self.status_box = QComboBox(self)
        self.status_box.setObjectName("runsStatus")
        self.status_box.addItem("All statuses", "")
        for s in RUN_STATUSES:
            self.status_box.addItem(s.capitalize(), s.value)
        self.status_box.currentIndexChanged.connect(
            lambda _i: self.proxy.set_filter(status=self.status_box.currentData())
        )
        refresh = QPushButton("Refresh", self)
        refresh.clicked.connect(self.refresh)
        self.lab_button = QPushButton("Methods lab…", self)
        self.lab_button.setObjectName("methodsLabButton")
        self.lab_button.setToolTip("Train every chosen PEFT method on one dataset and budget, side by side")
        self.lab_button.clicked.connect(self.open_methods_lab)
        self.methods_lab: MethodsLabDialog | None = None
        top = QHBoxLayout()
        top.addWidget(self.filter_edit, 1)
        top.addWidget(self.status_box)
        top.addWidget(refresh)
        top.addWidget(self.lab_button)

        self.table = QTableView(self)
        self.table.setObjectName("runsTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(10, Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.verticalHeader().hide()
        self.table.setWordWrap(False)
        self.table.setAlternatingRowColors(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.doubleClicked.connect(lambda _i: self._open())
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._selection_changed())
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._context_menu)

        self.open_button = QPushButton("Open", self)
        self.open_button.setToolTip("Show the run's curves and config on the Train page")
        self.open_button.clicked.connect(self._open)
        self.again_button = QPushButton("New run from this config", self)
        self.again_button.clicked.connect(self._again)
        self.resume_button = QPushButton("Resume", self)
        self.resume_button.clicked.connect(lambda: self._emit_one(self.resume_requested))
        self.export_button = QPushButton("Export", self)
        self.export_button.setToolTip("Write the adapter with its model card to exports/ and check it reloads")
        self.export_button.clicked.connect(lambda: self._emit_one(self.export_requested))
        self.export_as_button = QPushButton("Export as…", self)
        self.export_as_button.setToolTip("Choose the folder, the checkpoint and the formats (merged, GGUF, Ollama)")
        self.export_as_button.clicked.connect(lambda: self._emit_one(self.export_as_requested))
        self.slurm_button = QPushButton("Save SLURM script…", self)
        self.slurm_button.setObjectName("slurmButton")
        self.slurm_button.setToolTip(
            "Save an sbatch script that trains this run's config on several machines (torchrun on every node)"
        )
        self.slurm_button.clicked.connect(self.save_slurm)
        # what the Save SLURM script… action asks; tests answer instead of a person
        self.choose_slurm_options = lambda run: ask_slurm_options(self, run.name or run.id)
        self.choose_slurm_file = lambda suggested: QFileDialog.getSaveFileName(
            self, "Save the SLURM script", suggested, "SLURM scripts (*.sbatch *.sh);;All files (*)"
        )[0]
        for button, name in (
            (self.open_button, "runsOpen"),
            (self.again_button, "runsAgain"),
            (self.resume_button, "runsResume"),
            (self.export_button, "runsExport"),
            (self.export_as_button, "runsExportAs"),
        ):
            button.setObjectName(name)
        self.actions_buttons = (
            self.open_button,
            self.again_button,
            self.resume_button,
            self.export_button,
            self.export_as_button,
            self.slurm_button,
        )
        buttons = QWidget(self)
        row = FlowLayout(buttons)  # wraps onto a second row in a narrow window
        for b in self.actions_buttons:
            row.addWidget(b)

        self.overlay = Chart("Loss (smoothed) of the selected runs", self, legend=True)
        self.overlay.setObjectName("overlayChart")
        self.config_view = QPlainTextEdit(self)
        self.config_view.setObjectName("runConfig")
        self.config_view.setReadOnly(True)
        detail = QTabWidget(self)
        detail.addTab(self.overlay, "Loss curves")
        detail.addTab(self.config_view, "Config")
        self.speed_label = QLabel(self)  # the selected distillation's student timed beside its teacher
        self.speed_label.setObjectName("runsDistillSpeed")
        self.speed_label.setWordWrap(True)
        self.speed_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.speed_label.hide()
        left = QWidget(self)
        llay = QVBoxLayout(left)
        llay.setContentsMargins(0, 0, 0, 0)
        llay.addLayout(top)
        llay.addWidget(self.table, 1)
        llay.addWidget(buttons)
        llay.addWidget(self.speed_label)
        split = QSplitter(Qt.Orientation.Vertical, self)
        split.addWidget(left)
        split.addWidget(detail)
        QVBoxLayout(self).addWidget(split)
        self._selection_changed()
        guard_wheel(self)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def open_methods_lab(self) -> MethodsLabDialog:
        """The methods lab (one at a time); its runs appear here once it is done."""
        if self.methods_lab is None:
            self.methods_lab = MethodsLabDialog(self)
            self.methods_lab.finished_report.connect(lambda _report: self.refresh())
        self.methods_lab.show()
        return self.methods_lab

    def refresh(self) -> None:
        selected = set(self.selected_ids())
        first = not self.model.runs
        self.model.set_runs(self.store.list_runs(), earlier_sessions(self.store))
        if first and self.model.runs:
            self.table.resizeColumnsToContents()
            for col in range(self.model.columnCount()):
                self.table.setColumnWidth(col, min(self.table.columnWidth(col), 280))
        if self.model.runs:  # a status is short and must never be cut ("interrupted" may come after "completed")
            status = [key for key, _ in COLUMNS].index("status")
            self.table.setColumnWidth(status, max(self.table.columnWidth(status), self.table.sizeHintForColumn(status)))
        if selected:
            sel = self.table.selectionModel()
            for row in range(self.proxy.rowCount()):
                if self.proxy.index(row, 0).data(RUN_ID_ROLE) in selected:
                    sel.select(self.proxy.index(row, 0), sel.SelectionFlag.Select | sel.SelectionFlag.Rows)
        self._selection_changed()

    def selected_ids(self) -> list[str]:
        rows = self.table.selectionModel().selectedRows()
        return [r.data(RUN_ID_ROLE) for r in sorted(rows, key=lambda r: r.row())]

    def select_ids(self, run_ids: list[str]) -> None:
        sel = self.table.selectionModel()
        sel.clearSelection()
        for row in range(self.proxy.rowCount()):
            if self.proxy.index(row, 0).data(RUN_ID_ROLE) in run_ids:
                sel.select(self.proxy.index(row, 0), sel.SelectionFlag.Select | sel.SelectionFlag.Rows)

    def _run(self, run_id: str) -> RunRecord | None:
        return next((r for r in self.model.runs if r.id == run_id), None)

    def _selection_changed(self) -> None:
        ids = self.selected_ids()
        one = self._run(ids[0]) if len(ids) == 1 else None
        self.open_button.setEnabled(one is not None)
        self.again_button.setEnabled(one is not None)
        self.resume_button.setEnabled(one is not None and is_resumable(one.status))
        exportable = one is not None and is_exportable(one.status)
        self.export_button.setEnabled(exportable)
        self.export_as_button.setEnabled(exportable)
        self.slurm_button.setEnabled(one is not None)
        if one is not None:
            try:
                self.config_view.setPlainText(json.dumps(json.loads(one.config or "{}"), indent=2, sort_keys=True))
            except ValueError:
                self.config_view.setPlainText(one.config)
        else:
            self.config_view.setPlainText("")
        self._show_speed(one)
        self._draw_overlay(ids[:MAX_OVERLAY])

    def _show_speed(self, run: RunRecord | None) -> None:
        """One distillation run selected: its student's generation speed beside its teacher's, when it was timed."""
        speed = self.store.distill_speed(run.id) if run is not None and is_distill(run.config_dict()) else None
        self.speed_label.setVisible(speed is not None)
        if speed is not None:
            self.speed_label.setText(speed_line(speed))
            self.speed_label.setToolTip(speed_details(speed))

    def _draw_overlay(self, ids: list[str]) -> None:
        plot = self.overlay.getPlotItem()
        for curve in self.overlay.curves.values():
            plot.removeItem(curve)
        self.overlay.curves.clear()
        if plot.legend is not None:
            plot.legend.clear()
        for i, run_id in enumerate(ids):
            rows = self.store.metrics(run_id, "train")
            ema = Ema(0.9)
            xs = [r.step for r in rows]
            ys = [ema.update(r.loss) for r in rows]
            run = self._run(run_id)
            curve = make_curve(plot, PALETTE[i % len(PALETTE)], (run.name if run else "") or run_id, width=2)
            curve.setData(np.asarray(xs, dtype=float), np.array([np.nan if y is None else y for y in ys], dtype=float))
            self.overlay.curves[run_id] = curve
        self.overlay.following = True
        self.overlay._range = None
        self.overlay.fit()

    def _emit_one(self, signal) -> None:
        ids = self.selected_ids()
        if len(ids) == 1:
            signal.emit(ids[0])

    def run_menu(self) -> QMenu:
        """The selected run's actions, as the buttons under the table offer them (enabled alike)."""
        menu = QMenu(self)
        for button in self.actions_buttons:
            action = menu.addAction(button.text())
            action.setEnabled(button.isEnabled())
            action.triggered.connect(button.click)
        return menu

    def _context_menu(self, pos) -> None:
        self.run_menu().exec(self.table.viewport().mapToGlobal(pos))

    def save_slurm(self) -> None:
        """Save a SLURM sbatch script (and the run's config beside it) that trains the config on several
        machines."""
        ids = self.selected_ids()
        run = self._run(ids[0]) if len(ids) == 1 else None
        if run is None:
            return
        options = self.choose_slurm_options(run)
        if options is None:
            return
        path = self.choose_slurm_file(str(Path.home() / f"{run.id}.sbatch"))
        if not path:
            return
        try:
            config_path = save_slurm_script(Path(path), json.loads(run.config or "{}"), options)
        except (ConfigError, ValueError) as exc:
            self.message.emit(f"No SLURM script: the run's config is not valid ({exc})")
            return
        except OSError as exc:
            self.message.emit(f"Could not save the SLURM script: {exc.strerror or exc} ({path})")
            return
        self.message.emit(f"Saved {path} (config {config_path.name}); submit it with: sbatch {path}")

    def _open(self) -> None:
        self._emit_one(self.open_requested)

    def _again(self) -> None:
        ids = self.selected_ids()
        run = self._run(ids[0]) if len(ids) == 1 else None
        if run:
            try:
                self.new_from_config.emit(json.loads(run.config or "{}"))
            except ValueError:
                pass
