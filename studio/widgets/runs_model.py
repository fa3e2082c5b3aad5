"""The runs table: every run in the database with its status, set-up, duration and final metrics."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import cast

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt

from finetune_studio.core import methods
from finetune_studio.core.config import OBJECTIVE_LABELS
from finetune_studio.core.protocol.memory_report import MemoryReport
from finetune_studio.core.run_status import RunStatus
from finetune_studio.core.store import RunRecord
from finetune_studio.studio.state.run import format_bytes, format_duration

COLUMNS = (
    ("name", "Run"),
    ("status", "Status"),
    ("model", "Model"),
    ("dataset", "Dataset"),
    ("method", "Method"),
    ("objective", "Objective"),
    ("step", "Steps"),
    ("duration", "Duration"),
    ("final_loss", "Last loss"),
    ("eval_loss", "Eval loss"),
    ("created_at", "Created"),
    ("memory_budget_bytes", "Memory estimate"),
    ("memory_peak_bytes", "Measured peak"),
    ("memory_error", "Estimate error"),
)
DERIVED = ("duration", "memory_error")  # columns computed from the record, not fields of it
HEADER_TIPS = {
    "final_loss": "The loss of the run's last step, as it was (the Train page shows the smoothed loss)",
    "duration": "Training time, every session of a resumed run added",
}
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
RUN_ID_ROLE = Qt.ItemDataRole.UserRole + 2


def duration(run: RunRecord, earlier_s: float = 0.0) -> float | None:
    """How long the run has trained: its earlier sessions' training time (``earlier_s``, when it was resumed) and
    its last session's, from that session's start to its end, or to now while it trains (the end time a resumed
    run still carries is its previous session's)."""
    start = run.started_at or run.created_at
    end: float | None
    if run.status == RunStatus.RUNNING:
        end = time.time()
    else:
        finished = run.finished_at
        end = finished if finished and start and finished >= start else run.updated_at
    if not start or not end or end < start:
        return earlier_s or None
    return earlier_s + (end - start)


EARLIER_SESSIONS_SQL = """
SELECT run_id, SUM(elapsed_s) FROM (
    SELECT run_id, elapsed_s, LEAD(elapsed_s) OVER (PARTITION BY run_id ORDER BY step) AS next_elapsed
    FROM metrics WHERE kind = 'train' AND elapsed_s IS NOT NULL
) WHERE next_elapsed < elapsed_s GROUP BY run_id
"""


def earlier_sessions(store) -> dict[str, float]:
    """Run id -> the training time of its sessions before the last one (a resume starts the engine's step time
    again at 0, so a session ends at a step whose next step has a smaller time); runs never resumed are absent."""
    try:
        return {run_id: float(total) for run_id, total in store.db.execute(EARLIER_SESSIONS_SQL).fetchall()}
    except sqlite3.Error:
        return {}


def memory_error(run: RunRecord) -> float | None:
    """(estimate - measured peak) / measured peak: positive when the estimate was high; None before a peak."""
    budget, peak = run.memory_budget_bytes, run.memory_peak_bytes
    if not budget or not peak:
        return None
    return (budget - peak) / peak


def memory_tooltip(run: RunRecord) -> str | None:
    """What the estimate assumed and what was measured (CUDA: allocated and reserved; CPU: resident peak)."""
    text = run.memory_estimate
    if not text:
        return None
    try:
        report = MemoryReport.from_json(text)
    except (ValueError, TypeError, KeyError):
        return None
    lines = [f"Estimate {format_bytes(report.total_bytes)}: {report.lengths.description}"]
    lines += [f"  {name} {format_bytes(value)}" for name, value in report.components.items()]
    peak, reserved = run.memory_peak_bytes, run.memory_reserved_peak_bytes
    if peak:
        how = "allocator peak" if report.device_kind == "cuda" else "resident peak of the engine process"
        lines.append(
            f"Measured {format_bytes(peak)} ({how})" + (f", reserved {format_bytes(reserved)}" if reserved else "")
        )
    return "\n".join(lines)


class RunsModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.runs: list[RunRecord] = []
        self.earlier_s: dict[str, float] = {}  # run id -> training time before its last session (resumed runs)

    def set_runs(self, runs: list[RunRecord], earlier_s: dict[str, float] | None = None) -> None:
        self.beginResetModel()
        self.runs = list(runs)
        self.earlier_s = dict(earlier_s or {})
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.runs)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section][1]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return HEADER_TIPS.get(COLUMNS[section][0])
        return None

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        run = self.runs[index.row()]
        key = COLUMNS[index.column()][0]
        if role == RUN_ID_ROLE:
            return run.id
        if role == SORT_ROLE:
            value = (
                duration(run, self.earlier_s.get(run.id, 0.0))
                if key == "duration"
                else memory_error(run)
                if key == "memory_error"
                else getattr(run, key)
            )
            return -1e300 if value is None else value if isinstance(value, (int, float)) else str(value).lower()
        if role == Qt.ItemDataRole.ToolTipRole:
            if key in ("model", "dataset"):
                return getattr(run, key) or None
            if key == "status" and run.error:
                return run.error
            if key in ("memory_budget_bytes", "memory_peak_bytes", "memory_error"):
                return memory_tooltip(run)
            return None
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        value = None if key in DERIVED else getattr(run, key)
        if key == "duration":
            return format_duration(duration(run, self.earlier_s.get(run.id, 0.0)))
        if key in ("model", "dataset"):
            return Path(value).name if value and value != "default" else (value or "")
        if key in ("final_loss", "eval_loss"):
            return f"{value:.4f}" if isinstance(value, (int, float)) else ""
        if key == "step":
            total = run.total_steps
            return f"{value or 0} / {total}" if total else str(value or 0)
        if key in ("memory_budget_bytes", "memory_peak_bytes"):
            return format_bytes(value) if value else ""
        if key == "memory_error":
            err = memory_error(run)
            return "" if err is None else f"{err:+.1%}"
        if key == "created_at":
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(value)) if value else ""
        if key in ("method", "objective"):
            return (
                OBJECTIVE_LABELS.get(str(value), str(value or "").upper())
                if key == "objective"
                else (methods.BY_NAME[str(value)].label if str(value) in methods.BY_NAME else str(value or ""))
            )
        return "" if value is None else str(value)


class RunsFilter(QSortFilterProxyModel):
    """Text filter over every column plus a status filter; sorts by raw values, not display text."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.status = ""
        self.setSortRole(SORT_ROLE)

    def set_filter(self, text: str | None = None, status: str | None = None) -> None:
        self.beginFilterChange() if hasattr(self, "beginFilterChange") else None
        if text is not None:
            self.text = text.strip().lower()
        if status is not None:
            self.status = status
        self.invalidateFilter() if not hasattr(self, "endFilterChange") else self.endFilterChange()

    def filterAcceptsRow(self, row: int, parent) -> bool:
        run = cast(RunsModel, self.sourceModel()).runs[row]
        if self.status and run.status != self.status:
            return False
        if not self.text:
            return True
        hay = " ".join(
            str(getattr(run, k) or "") for k in ("id", "name", "status", "model", "dataset", "method", "objective")
        ).lower()
        return all(word in hay for word in self.text.split())
