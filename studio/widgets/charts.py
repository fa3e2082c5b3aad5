"""Live training charts with pyqtgraph, fluid at 100,000 points.

Curves read views of the run's numpy columns (no copy), draw only what is in
view (``clipToView``) and downsample to the pixel width (``peak`` keeps spikes
visible). Redraws are throttled and staggered: a burst of events costs one
redraw per chart, and the charts repaint one per event-loop turn (a repaint of
one chart costs 10-40 ms on a busy CPU; all six at once would stall the loop).
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QTimer
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QGridLayout, QWidget

from finetune_studio.studio.state.run import RunState

pg.setConfigOptions(antialias=False, useNumba=False)

COLORS = {
    "raw": (120, 160, 230),
    "smooth": (30, 90, 200),
    "eval": (230, 120, 40),
    "lr": (150, 90, 200),
    "grad": (200, 70, 90),
    "tps": (40, 160, 120),
    "margin": (30, 90, 200),
    "acc": (230, 120, 40),
    "used": (40, 160, 120),
    "peak": (200, 70, 90),
    "budget": (120, 120, 120),
}
TICK_MS = 30  # one chart is redrawn per tick
EMPTY_STEPS = 10  # the step axis of a chart without data when the run's length is not known yet


def make_curve(
    plot: pg.PlotItem, color, name: str, width: float = 1.5, dash: bool = False, symbol: str | None = None
) -> pg.PlotDataItem:
    pen = pg.mkPen(
        color=color, width=width, style=pg.QtCore.Qt.PenStyle.DashLine if dash else pg.QtCore.Qt.PenStyle.SolidLine
    )
    kw = dict(symbol=symbol, symbolSize=6, symbolBrush=color, symbolPen=None) if symbol else {}
    item = plot.plot([], [], pen=pen, name=name, connect="finite", **kw)
    item.setDownsampling(auto=True, method="peak")
    item.setClipToView(True)
    return item


class Chart(pg.PlotWidget):
    def __init__(self, title: str, parent: QWidget | None = None, *, legend: bool = False, from_zero: bool = False):
        super().__init__(parent)
        self.from_zero = from_zero  # quantities such as memory read best against zero
        self.setObjectName(f"chart_{title.split()[0].lower()}")
        self.title = title
        item = self.getPlotItem()
        item.setTitle(title)
        item.setLabel("bottom", "step")
        item.setMenuEnabled(False)
        self.setMinimumHeight(110)  # two rows of charts still fit a 768-pixel screen at 125 %
        self.headroom = 0.1  # of the data's span, above its top
        if legend:  # one row across the top, with room kept for it above the data (it used to cover the curves)
            item.addLegend(offset=(-6, 2), colCount=6, labelTextSize="8pt", verSpacing=-6)
            self.headroom = 0.3
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.following = True  # the chart sets its own range until the person zooms or pans
        self._range: tuple[float, float, float, float] | None = None
        vb = item.getViewBox()
        vb.disableAutoRange()
        vb.sigRangeChangedManually.connect(self._manual)
        item.hideButtons()
        apply_palette(self)

    def _manual(self, *_args) -> None:
        self.following = False

    def mouseDoubleClickEvent(self, event) -> None:
        """Double-click: follow the data again after a zoom or pan."""
        self.following = True
        self._range = None
        self.fit()
        super().mouseDoubleClickEvent(event)

    def fit(self, x_max: float | None = None, extra_y: float | None = None) -> None:
        """Set the view to the data, changing it only when the data leave it (or fill a small part of it):
        a changed range makes pyqtgraph rebuild both axes (~7 ms each in Python), so it must be rare."""
        if not self.following:
            return
        lo, hi, xhi = np.inf, -np.inf, float(x_max or 0)
        for curve in self.curves.values():
            if not curve.isVisible():
                continue
            xs, ys = curve.xData, curve.yData
            if ys is None or not len(ys):
                continue
            finite = ys[np.isfinite(ys)]
            if len(finite):
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            xhi = max(xhi, float(xs[-1]) if len(xs) else 0.0)
        if extra_y:
            lo, hi = min(lo, extra_y), max(hi, extra_y)
        if self.from_zero and np.isfinite(lo):
            lo = min(lo, 0.0)
        if not np.isfinite(lo):  # nothing yet (a run before its first step): its steps, nothing of an earlier run's
            empty = (0.0, float(x_max or EMPTY_STEPS), 0.0, 1.0)
            if self._range != empty:
                self._range = empty
                self.getPlotItem().getViewBox().setRange(xRange=empty[:2], yRange=empty[2:], padding=0)
            return
        span = max(hi - lo, abs(hi) * 0.05, 1e-12)
        want_x = max(1.0, xhi)
        old = self._range
        if old is not None:
            ox, oy0, oy1 = old[1], old[2], old[3]
            inside = lo >= oy0 and hi <= oy1 and want_x <= ox
            snug = (hi - lo) >= 0.4 * (oy1 - oy0) and want_x >= 0.5 * ox
            if inside and snug:
                return
        x_top = want_x if x_max else want_x * 1.25
        bottom = 0.0 if self.from_zero and lo >= 0 else lo - 0.1 * span
        self._range = (0.0, x_top, bottom, hi + self.headroom * span)
        self.getPlotItem().getViewBox().setRange(xRange=(0, x_top), yRange=self._range[2:], padding=0)

    def add(self, key: str, name: str, color_key: str, **kw) -> pg.PlotDataItem:
        self.curves[key] = make_curve(self.getPlotItem(), COLORS[color_key], name, **kw)
        return self.curves[key]

    def changeEvent(self, event) -> None:
        if event.type() == QEvent.Type.PaletteChange and getattr(self, "curves", None) is not None:
            apply_palette(self)
        super().changeEvent(event)


def apply_palette(widget: pg.PlotWidget) -> None:
    """Follow the app's light or dark palette."""
    pal = widget.palette()
    widget.setBackground(pal.color(QPalette.ColorRole.Base))
    fg = pal.color(QPalette.ColorRole.Text)
    item = widget.getPlotItem()
    for axis in ("left", "bottom"):
        ax = item.getAxis(axis)
        ax.setPen(pg.mkPen(fg))
        ax.setTextPen(pg.mkPen(fg))
    item.titleLabel.setText(getattr(widget, "title", ""), color=QColor(fg).name())


class StaggeredCharts(QWidget):
    """Charts that redraw one per timer tick (``TICK_MS``), each only once it has new data, hidden ones when shown.

    A subclass sets ``charts``, defines :meth:`_empty` (no data: a new run), :meth:`_update` (hand one chart its
    columns) and, if some charts show only for some runs, :meth:`_visibility`; then calls :meth:`_start_redraws`.
    """

    charts: list[Chart]

    def _start_redraws(self, state: RunState) -> None:
        self._dirty: list[Chart] = []
        self._timer = QTimer(self, interval=TICK_MS)
        self._timer.timeout.connect(self._tick)
        self.redraws = 0
        state.subscribe(self._on_state)

    def _empty(self) -> bool:
        raise NotImplementedError

    def _update(self, chart: Chart) -> None:
        raise NotImplementedError

    def _visibility(self) -> None:
        """Show the charts this run has figures for; all of them by default."""

    def _on_state(self, topic: str) -> None:
        if topic not in ("metrics", "info"):
            return
        if self._empty():
            self.refresh()  # a new run: clear every chart at once (hidden ones too), it costs nothing without data
            return
        for chart in self.charts:
            if chart not in self._dirty:
                self._dirty.append(chart)
        if not self._timer.isActive():
            self._timer.start()
            self._tick()

    def _tick(self) -> None:
        """Redraw the next chart that has new data (hidden ones are skipped until shown)."""
        self._visibility()
        while self._dirty:
            chart = self._dirty.pop(0)
            if chart.isVisible() or not self.isVisible():
                self._update(chart)
                return
        self._timer.stop()

    def refresh(self) -> None:
        """Hand the current columns to every curve at once (views, not copies)."""
        self._visibility()
        for chart in self.charts:
            self._update(chart)
        self._dirty.clear()


class TrainingCharts(StaggeredCharts):
    """The run's curves; subscribes to a :class:`RunState` and redraws at most every ``REFRESH_MS``."""

    def __init__(self, state: RunState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.loss = Chart("Loss", self, legend=True)
        self.loss.add("loss", "train", "raw", width=1)
        self.loss.add("loss_smooth", "smoothed", "smooth", width=2)
        self.loss.add("eval_loss", "eval", "eval", width=2, symbol="o")
        self.lr = Chart("Learning rate", self)
        self.lr.add("lr", "lr", "lr")
        self.grad = Chart("Grad norm", self)
        self.grad.add("grad_norm", "grad norm", "grad")
        self.tps = Chart("Tokens per second", self, from_zero=True)
        self.tps.add("tokens_per_s", "tokens/s", "tps")
        self.dpo = Chart("DPO reward margin / accuracy", self, legend=True)
        self.dpo.add("reward_margin", "margin", "margin")
        self.dpo.add("reward_accuracy", "accuracy", "acc", dash=True)
        self.memory = Chart("Memory (GiB)", self, legend=True, from_zero=True)
        self.memory.add("memory_used_bytes", "used", "used")
        self.memory.add("memory_peak_bytes", "peak", "peak")
        self.budget_line = pg.InfiniteLine(
            angle=0,
            movable=False,
            label="budget",
            pen=pg.mkPen(COLORS["budget"], width=1, style=pg.QtCore.Qt.PenStyle.DashLine),
            labelOpts={"position": 0.08, "color": COLORS["budget"], "anchors": [(0.0, 1.0), (0.0, 1.0)]},
        )
        self.budget_line.hide()
        self.memory.addItem(self.budget_line)
        # memory sits well above zero: its legend goes to the empty bottom right, clear of the budget line's label
        legend = self.memory.getPlotItem().legend
        legend.anchor(itemPos=(1, 1), parentPos=(1, 1), offset=(-6, -34))
        self.memory.headroom = 0.15
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.loss, 0, 0, 1, 2)
        grid.addWidget(self.memory, 0, 2)
        grid.addWidget(self.lr, 1, 0)
        grid.addWidget(self.grad, 1, 1)
        grid.addWidget(self.tps, 1, 2)
        grid.addWidget(self.dpo, 2, 0, 1, 3)
        self.dpo.hide()
        self.charts = [self.loss, self.memory, self.lr, self.grad, self.tps, self.dpo]
        self._start_redraws(state)

    def _empty(self) -> bool:
        return not self.state.train.n and not self.state.eval.n

    def _visibility(self) -> None:
        self._update_dpo_visibility()

    def _update_dpo_visibility(self) -> None:
        margin = self.state.train.column("reward_margin")
        has_dpo = bool(len(margin)) and bool(np.isfinite(margin[-min(len(margin), 50) :]).any())
        want = has_dpo or str(self.state.info.config.get("objective")) == "dpo"
        if want != (not self.dpo.isHidden()):
            self.dpo.setVisible(want)

    def _update(self, chart: Chart) -> None:
        t, e = self.state.train, self.state.eval
        x = t.column("step")
        if chart is self.memory:
            gib = float(1 << 30)
            for key, curve in chart.curves.items():
                curve.setData(x, t.column(key) / gib)
            budget: float | None = self.state.memory_budget_bytes
            self.budget_line.setVisible(bool(budget))
            if budget:
                self.budget_line.setValue(budget / gib)
        else:
            for key, curve in chart.curves.items():
                if key == "eval_loss":
                    curve.setData(e.column("step"), e.column("eval_loss"))
                else:
                    curve.setData(x, t.column(key))
        budget = self.state.memory_budget_bytes / float(1 << 30) if chart is self.memory else None
        chart.fit(self.state.info.total_steps or None, budget or None)
        self.redraws += 1

    def displayed_points(self) -> int:
        """How many points the loss curve actually draws (after clipping and downsampling)."""
        xs, _ = self.loss.curves["loss"].getData()
        return 0 if xs is None else len(xs)
