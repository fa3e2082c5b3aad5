"""Growable series, smoothing, and charts that stay light with 100,000 points."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from studio_support import IGNORE_OFFSCREEN

from finetune_studio.core.protocol.events import Eval, Started, Step
from finetune_studio.studio.state.run import RunState
from finetune_studio.studio.state.series import Columns, Ema

pytestmark = IGNORE_OFFSCREEN


def test_columns_grow_by_doubling_and_keep_values():
    cols = Columns(("step", "loss"), capacity=16)
    for i in range(1, 1001):
        cols.append(step=i, loss=1.0 / i)
    assert len(cols) == 1000 and cols._cap == 1024
    assert cols.column("step")[-1] == 1000 and cols.column("loss")[1] == 0.5
    cols.append(step=1001)  # a missing value is NaN
    assert math.isnan(cols.column("loss")[-1]) and cols.last("loss") is None
    cols.truncate_after("step", 10)
    assert len(cols) == 10 and cols.last("step") == 10
    cols.extend([{"step": 11, "loss": 0.1}, {"step": 12, "loss": None}])
    assert list(cols.column("step")[-2:]) == [11, 12]
    with pytest.raises(ValueError):
        cols.column("loss")[0] = 3.0  # views handed to charts are read-only


def test_ema_is_debiased():
    ema = Ema(0.9)
    assert ema.update(4.0) == pytest.approx(4.0)
    assert ema.update(4.0) == pytest.approx(4.0)
    assert ema.update(None) == pytest.approx(4.0)
    v = ema.update(0.0)
    assert 0 < v < 4.0


def step(i, total=100, **kw):
    base = dict(
        step=i,
        total_steps=total,
        loss=2.0,
        lr=1e-4,
        grad_norm=1.0,
        tokens_per_s=50.0,
        memory_used_bytes=1 << 30,
        memory_peak_bytes=1 << 31,
        elapsed_s=0.5 * i,
    )
    base.update(kw)
    return Step(**base)


def test_run_state_folds_events_eta_and_resume():
    st = RunState()
    topics = []
    st.subscribe(topics.append)
    st.apply(Started(run_id="r", run_dir="d", total_steps=100, memory_budget_bytes=5 << 30))
    assert st.status == "running" and st.memory_budget_bytes == 5 << 30
    for i in range(1, 11):
        st.apply(step(i))
    st.apply(Eval(step=10, eval_loss=1.5))
    assert len(st.train) == 10 and len(st.eval) == 1 and "metrics" in topics
    assert st.eta_s() == pytest.approx(45.0)  # 90 steps left at 0.5 s per step
    assert st.fraction == pytest.approx(0.1)
    # A resume from step 6 drops the steps after the checkpoint.
    st.apply(Started(run_id="r", run_dir="d", total_steps=100, resumed_from_step=6))
    assert len(st.train) == 6 and len(st.eval) == 0
    st.apply(step(7))
    assert list(st.train.column("step")) == [1, 2, 3, 4, 5, 6, 7]


def test_charts_stay_light_with_100k_points(qtbot, capsys):
    from finetune_studio.studio.widgets.charts import TrainingCharts

    st = RunState()
    st.apply(Started(run_id="r", run_dir="d", total_steps=200_000))
    rng = np.random.default_rng(0)
    losses = 3.0 * np.exp(-np.arange(100_000) / 30_000) + 0.1 * rng.standard_normal(100_000)
    t0 = time.perf_counter()
    st.load_history(
        [
            {
                "step": i + 1,
                "loss": float(losses[i]),
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens_per_s": 100.0,
                "memory_used_bytes": 1 << 30,
                "memory_peak_bytes": 1 << 30,
            }
            for i in range(100_000)
        ],
        [],
    )
    load_s = time.perf_counter() - t0
    charts = TrainingCharts(st)
    qtbot.addWidget(charts)
    charts.resize(1200, 700)
    charts.show()
    qtbot.waitExposed(charts)
    charts.refresh()
    qtbot.wait(50)
    xs, _ = charts.loss.curves["loss"].getOriginalDataset()
    assert len(xs) == 100_000
    drawn = charts.displayed_points()
    assert 0 < drawn < 10_000, drawn  # downsampled to about the pixel width
    # Appending one step and redrawing the loss chart stays cheap at this size.
    times = []
    for i in range(100_001, 100_021):
        st.apply(step(i, total=200_000, loss=0.5))
        t = time.perf_counter()
        charts._update(charts.loss)
        charts.loss.repaint()
        times.append((time.perf_counter() - t) * 1000)
    with capsys.disabled():
        print(
            f"\n100k points: history load {load_s:.2f} s, loss chart update+repaint median "
            f"{np.median(times):.1f} ms, max {max(times):.1f} ms, drawn points {drawn}"
        )
    assert len(charts.loss.curves["loss"].getOriginalDataset()[0]) == 100_020


def test_charts_follow_a_dark_palette(qtbot):
    from PySide6.QtGui import QPalette
    from PySide6.QtWidgets import QApplication

    from finetune_studio.studio.theme import dark_palette
    from finetune_studio.studio.widgets.charts import Chart

    app = QApplication.instance()
    chart = Chart("Loss")
    qtbot.addWidget(chart)
    light = chart.backgroundBrush().color().lightness()
    old = app.palette()
    try:
        app.setPalette(dark_palette())
        qtbot.waitUntil(lambda: chart.backgroundBrush().color().lightness() < 80, timeout=2000)
        assert chart.backgroundBrush().color() == dark_palette().color(QPalette.ColorRole.Base)
    finally:
        app.setPalette(old)
    assert light > 150


def test_dpo_chart_appears_with_reward_statistics(qtbot):
    from finetune_studio.studio.widgets.charts import TrainingCharts

    st = RunState()
    charts = TrainingCharts(st)
    qtbot.addWidget(charts)
    charts.show()
    st.apply(Started(run_id="r", run_dir="d", total_steps=10))
    st.apply(step(1, total=10))
    charts.refresh()
    assert charts.dpo.isHidden()  # SFT: no reward statistics, no DPO chart
    for i in range(2, 6):
        st.apply(step(i, total=10, reward_margin=0.1 * i, reward_accuracy=0.5 + 0.05 * i))
    charts.refresh()
    assert not charts.dpo.isHidden()
    xs, ys = charts.dpo.curves["reward_margin"].getOriginalDataset()
    assert list(xs) == [1, 2, 3, 4, 5] and np.isnan(ys[0]) and ys[-1] == pytest.approx(0.5)


def _steps(state: RunState, n: int, total: int = 50) -> None:
    for i in range(1, n + 1):
        state.apply(
            Step(
                step=i,
                total_steps=total,
                loss=2.0 / i,
                lr=1e-4,
                grad_norm=1.0,
                tokens_per_s=500.0,
                memory_used_bytes=1 << 30,
                memory_peak_bytes=(1 << 30) + i,
                elapsed_s=0.1 * i,
            )
        )


def test_a_new_run_starts_on_empty_charts(qtbot):
    """Between Start and the first step the charts show nothing of the previous run: no curve, no budget line, and
    the axes of the new run (its steps), not the old one's."""
    from finetune_studio.studio.widgets.charts import TrainingCharts

    state = RunState()
    charts = TrainingCharts(state)
    qtbot.addWidget(charts)
    charts.resize(900, 600)
    charts.show()
    qtbot.waitExposed(charts)
    state.apply(Started(run_id="first", run_dir="/tmp/first", total_steps=50, memory_budget_bytes=2 << 30))
    _steps(state, 50)
    charts.refresh()
    assert len(charts.loss.curves["loss"].getData()[0]) > 0 and charts.budget_line.isVisible()
    old_x = charts.loss.getPlotItem().getViewBox().viewRange()[0]

    state.reset("starting")  # Start pressed: the controller begins the new run
    state.info.total_steps = 200
    state.notify("info")
    qtbot.waitUntil(lambda: not charts._timer.isActive(), timeout=3000)

    for chart in charts.charts:
        for curve in chart.curves.values():
            xs, _ = curve.getData()
            assert xs is None or len(xs) == 0, chart.title
    assert not charts.budget_line.isVisible()
    x_range = charts.loss.getPlotItem().getViewBox().viewRange()[0]
    assert x_range != old_x and x_range[1] == pytest.approx(200)  # the new run's steps, before its first one
