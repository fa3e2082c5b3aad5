"""The rollouts of an online RL run: a sortable table of the latest step's (or every step's) sampled answers with
their rewards, the selected answer in full beside it, and *Send to Annotate*.

The table follows the run: each ``rollouts`` event (or each poll of a followed run) refreshes it, keeping the
selection. While rows are selected in the latest-step view, that step stays on screen (a new step would take the rows
from under the pointer); clearing the selection follows the run again.
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut, QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.studio.state.rollouts import Rollout, Rollouts

FIXED = [("step", "Step"), ("group", "Group"), ("reward", "Reward"), ("advantage", "Adv.")]
HEADER_CHARS = 12  # a reward function's column title at most (the full name in its tooltip)
SCOPE_TEXT = {"latest": "Latest step", "all": "All steps"}
AnyIndex = QModelIndex | QPersistentModelIndex


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3g}"


class RolloutsModel(QAbstractTableModel):
    """The table's rows: :meth:`Rollouts.view` of the chosen scope and sort; reward functions are columns."""

    def __init__(self, rollouts: Rollouts, parent: QWidget | None = None):
        super().__init__(parent)
        self.rollouts = rollouts
        self.sorted = rollouts.sorted_view()  # scope, sort key and order, the step held while rows are selected
        self.rows: list[Rollout] = []
        self.functions: list[str] = []

    # --- columns -----------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [k for k, _ in FIXED] + [f"reward/{f}" for f in self.functions] + ["length", "prompt"]

    def headers(self) -> list[str]:
        """Column titles; a long reward function's name is shortened (in full in the tooltip)."""
        short = [f if len(f) <= HEADER_CHARS else f[: HEADER_CHARS - 1] + "…" for f in self.functions]
        return [h for _, h in FIXED] + short + ["Answer", "Prompt"]

    @property
    def scope(self) -> str:
        return self.sorted.scope

    @property
    def sort_key(self) -> str:
        return self.sorted.sort

    @property
    def pinned_step(self) -> int | None:
        return self.sorted.step

    def shown_step(self) -> int:
        return self.pinned_step if self.pinned_step is not None else self.rollouts.last_step

    def reload(self) -> None:
        self.beginResetModel()
        self.functions = list(self.rollouts.functions)
        self.rows = list(self.sorted.update())
        self.endResetModel()

    # --- Qt's model ----------------------------------------------------------------------
    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.keys())

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            headers = self.headers()
            return headers[section] if 0 <= section < len(headers) else None
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            key = self.keys()[section] if 0 <= section < len(self.keys()) else ""
            if key.startswith("reward/"):
                return f"Reward function {key[len('reward/') :]}: its score (click to sort)"
            tips = {"advantage": "Advantage: the reward against its group's mean, in the group's standard deviations"}
            return tips.get(key, "Click to sort")
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self.rows):
            return None
        r, key = self.rows[index.row()], self.keys()[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            if key in ("step", "group"):
                return str(getattr(r, key))
            if key == "length":
                return " ".join(r.completion.split())  # one line: the table is for scanning, the pane for reading
            if key == "prompt":
                return " ".join(r.prompt.split())
            return _fmt(float(r.sort_value(key)))
        if role == Qt.ItemDataRole.ToolTipRole and key in ("length", "prompt"):
            return (r.completion if key == "length" else r.prompt)[:2000]
        if role == Qt.ItemDataRole.TextAlignmentRole and key not in ("length", "prompt"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        keys = self.keys()
        if 0 <= column < len(keys):
            self.sorted.sort, self.sorted.descending = keys[column], order == Qt.SortOrder.DescendingOrder
            self.reload()


class RolloutsView(QWidget):
    """The rollouts table, the chosen answer in full, and Send to Annotate (``send_requested``: the chosen
    rollouts and the chosen answers' groups, from which a single answer's partner is picked)."""

    send_requested = Signal(list, list)

    def __init__(self, rollouts: Rollouts, parent: QWidget | None = None):
        super().__init__(parent)
        self.rollouts = rollouts
        self.model = RolloutsModel(rollouts, self)
        self.summary = QLabel(self)
        self.summary.setObjectName("rolloutsSummary")
        self.scope = QComboBox(self)
        self.scope.setObjectName("rolloutsScope")
        for key, text in SCOPE_TEXT.items():
            self.scope.addItem(text, key)
        self.scope.currentIndexChanged.connect(self._scope_changed)
        self.send_button = QPushButton("Send to Annotate", self)
        self.send_button.setObjectName("sendToAnnotate")
        self.send_button.setToolTip(
            "Label the selected answers (to one prompt) in Annotate: they join the run's labelling session as pairs "
            "(a single answer is paired with its group's answer of the most different reward)"
        )
        self.send_button.clicked.connect(self.send)
        self.message = QLabel(self)
        self.message.setObjectName("rolloutsMessage")
        self.message.setWordWrap(True)
        self.table = QTableView(self)
        self.table.setObjectName("rolloutsTable")
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setSortingEnabled(True)
        self.table.horizontalHeader().setSortIndicator(2, Qt.SortOrder.DescendingOrder)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 6)
        self.table.setWordWrap(False)
        self.table.setAlternatingRowColors(True)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.detail = QPlainTextEdit(self)
        self.detail.setObjectName("rolloutDetail")
        self.detail.setReadOnly(True)
        self.detail.setPlaceholderText("Click a rollout to read its prompt and answer in full, with every score.")
        head = QHBoxLayout()
        head.addWidget(self.summary, 1)
        head.addWidget(self.scope)
        head.addWidget(self.send_button)
        split = QSplitter(Qt.Orientation.Horizontal, self)
        split.addWidget(self.table)
        split.addWidget(self.detail)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 1)
        split.setChildrenCollapsible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(head)
        lay.addWidget(self.message)
        lay.addWidget(split, 1)
        self.message.hide()
        clear = QShortcut(QKeySequence("Escape"), self.table, activated=self.table.clearSelection)  # type: ignore[call-overload]
        clear.setContext(Qt.ShortcutContext.WidgetShortcut)  # Esc on the table only (other pages have their own Esc)
        self._selecting = False
        self._sized = False
        rollouts.subscribe(lambda _topic: self.reload())
        self.reload()

    # --- showing -------------------------------------------------------------------------
    def selected(self) -> list[Rollout]:
        rows = sorted({i.row() for i in self.table.selectionModel().selectedRows()})
        return [self.model.rows[r] for r in rows if r < len(self.model.rows)]

    def reload(self) -> None:
        """Refresh from the rollouts, keeping the selected rows selected (and, in the latest view, their step)."""
        keep = {r.key for r in self.selected()}
        if not len(self.rollouts):
            keep, self.model.sorted.step = set(), None
        widths = [self.table.columnWidth(c) for c in range(self.model.columnCount())]
        functions = list(self.model.functions)
        scrolled = self.table.verticalScrollBar().value()  # a person reading down the table stays where they are
        self._selecting = True
        try:
            self.model.reload()
            if self.model.functions == functions:
                for c, w in enumerate(widths):
                    self.table.setColumnWidth(c, w)
            else:
                self._size_columns()
            sel = self.table.selectionModel()
            for i, r in enumerate(self.model.rows if keep else ()):
                if r.key in keep:
                    sel.select(
                        self.model.index(i, 0),
                        sel.SelectionFlag.Select | sel.SelectionFlag.Rows,
                    )
        finally:
            self._selecting = False
        self.table.verticalScrollBar().setValue(scrolled)
        self._selection_changed()

    def _size_columns(self) -> None:
        """Each figure's column as wide as its header (with the sort arrow) or a figure such as -0.0123, whichever
        is wider; the answer gets the room left beside them, the prompt (read in full in the pane) the rest."""
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        metrics = header.fontMetrics()
        figure = self.fontMetrics().horizontalAdvance("-0.0123") + 12
        for c, (key, title) in enumerate(zip(self.model.keys(), self.model.headers(), strict=True)):
            if key == "length":
                header.setSectionResizeMode(c, QHeaderView.ResizeMode.Stretch)
            elif key == "prompt":
                self.table.setColumnWidth(c, metrics.horizontalAdvance("Prompt") * 2)
            else:
                width = max(metrics.horizontalAdvance(title) + 22, figure if key not in ("step", "group") else 0)
                self.table.setColumnWidth(c, width)

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if not self._sized:  # the first time on screen: the columns fitted to the table's real width
            self._sized = True
            self._size_columns()

    def _scope_changed(self) -> None:
        self.model.sorted.scope = str(self.scope.currentData())
        self.model.sorted.step = None
        self.table.clearSelection()
        self.reload()

    def _selection_changed(self, *_args: object) -> None:
        if self._selecting:
            return
        chosen = self.selected()
        m = self.model
        if m.scope == "latest":  # rows selected: hold their step; none: follow the run again
            pin = chosen[0].step if chosen else None
            if pin != m.pinned_step:
                m.sorted.step = pin
                if pin is None and m.shown_step() != (m.rows[0].step if m.rows else -1):
                    self.reload()
                    return
        self._show_summary(chosen)
        self._show_detail(chosen)
        self.send_button.setEnabled(bool(chosen))

    def _show_summary(self, chosen: list[Rollout]) -> None:
        n, m = len(self.rollouts), self.model
        if not n:
            self.summary.setText("No rollouts yet: an online RL run (GRPO) shows its sampled answers here.")
            return
        held = m.pinned_step is not None and m.pinned_step != self.rollouts.last_step
        where = (
            f"step {m.shown_step()}"
            + (f" (held while rows are selected; latest {self.rollouts.last_step})" if held else "")
            if m.scope == "latest"
            else "all steps"
        )
        picked = f" · {len(chosen)} selected" if chosen else " · click a row; Ctrl/Shift+click for more"
        self.summary.setText(f"{len(m.rows)} rollouts of {where} ({n} in all){picked}")

    def _show_detail(self, chosen: list[Rollout]) -> None:
        if not chosen:
            self.detail.setPlainText("")
            return
        r = chosen[-1]
        scores = "  ".join(f"{k} {_fmt(v)}" for k, v in r.rewards.items())
        text = (
            f"Step {r.step} · group {r.group} · reward {_fmt(r.reward)} · advantage {_fmt(r.advantage)}\n"
            + (f"{scores}\n" if scores else "")
            + f"\nPrompt:\n{r.prompt}\n\nAnswer:\n{r.completion}"
        )
        if len(chosen) > 1:
            text = f"{len(chosen)} selected; the last one clicked:\n" + text
        self.detail.setPlainText(text)

    def say(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))

    # --- sending -------------------------------------------------------------------------
    def send(self) -> None:
        chosen = self.selected()
        groups: list[Rollout] = []
        for r in chosen:
            groups += [g for g in self.rollouts.group_of(r) if g not in groups]
        self.send_requested.emit(chosen, groups)
