"""The charts of a distillation run, beside the loss charts: the divergence to the teacher (``kl``) and the task loss
(``ce``, the cross-entropy of the trained tokens), both per trained token, at each step and at each evaluation.

The figures are the steps' and evaluations' named metrics (``Step.metrics`` / ``Eval.metrics``, kept in the database's
``named_metrics``), read from :class:`~studio.state.run.RunState`'s ``figures`` and ``eval_figures``. Redrawn as the
other charts are (:class:`~studio.widgets.charts.StaggeredCharts`): one chart per event-loop turn, the view range
changed only when the data leave it.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QGridLayout, QWidget

from finetune_studio.studio.state.distill import is_distill
from finetune_studio.studio.state.run import RunState
from finetune_studio.studio.widgets.charts import Chart, StaggeredCharts

# each chart: its object name, title, the figure it draws, the colour of its training curve (charts.COLORS), and
# whether its scale starts at zero (a divergence reads best against zero; a loss, like the loss chart, by its span)
CHARTS = (
    ("chart_distill_kl", "Divergence to the teacher (per token)", "kl", "lr", True),
    ("chart_distill_ce", "Task loss: cross-entropy (per token)", "ce", "tps", False),
)


class DistillCharts(StaggeredCharts):
    """KL to the teacher and CE, train (each step) and eval (each evaluation); subscribes to the :class:`RunState`."""

    def __init__(self, state: RunState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        text = self.palette().color(QPalette.ColorRole.Text)  # legends in the text's colour (pyqtgraph's grey is faint)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.figure_of: dict[Chart, str] = {}
        for column, (name, title, key, color, from_zero) in enumerate(CHARTS):
            chart = Chart(title, self, legend=True, from_zero=from_zero)
            chart.setObjectName(name)
            chart.getPlotItem().legend.setLabelTextColor(text)
            chart.add("train", "train", color)
            chart.add("eval", "eval", "eval", width=2, symbol="o")
            grid.addWidget(chart, 0, column)
            self.figure_of[chart] = key
        self.kl, self.ce = self.figure_of
        self.charts = list(self.figure_of)
        self._start_redraws(state)

    @property
    def has_any(self) -> bool:
        """Whether the run is a distillation (its objective, or its figures when the config is not known)."""
        return is_distill(self.state.info.config, self.state.figures.names)

    def _empty(self) -> bool:
        return not self.state.figures.n and not self.state.eval_figures.n

    def _update(self, chart: Chart) -> None:
        key = self.figure_of[chart]
        train, evals = self.state.figures, self.state.eval_figures
        if not self.has_any:  # another objective's figures: nothing of them here (its tab is hidden)
            for curve in chart.curves.values():
                curve.setData([], [])
        else:
            chart.curves["train"].setData(train.steps(), train.column(key))
            points = evals.column(key)
            shown = np.isfinite(points)  # the evaluations that have this figure (a scatter of NaN alone warns)
            chart.curves["eval"].setData(evals.steps()[shown], points[shown])
        chart.fit(self.state.info.total_steps or None)
        self.redraws += 1
