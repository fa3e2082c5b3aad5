"""The charts of an online RL run (GRPO) and of a reward model, beside the loss charts.

GRPO, at each step: the mean total reward with its spread (± one standard deviation across the step's rollouts,
shaded) and each reward function's mean, and at each evaluation the held-out prompts' greedy answers' reward; the
KL to the reference; the completions' mean length; the fraction of tokens whose ratio was clipped. A reward model,
at each evaluation: held-out pair accuracy and the reward gap (chosen minus rejected). Redrawn as
:class:`~studio.widgets.charts.TrainingCharts` are: one chart per event-loop turn, the view range changed only when
the data leave it.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QGridLayout, QWidget

from finetune_studio.core.config import SAMPLING_OBJECTIVES
from finetune_studio.studio.state.rl_figures import ACCURACY_KEYS, GAP_KEYS, REWARD_PREFIX, StepFigures
from finetune_studio.studio.state.run import RunState
from finetune_studio.studio.widgets.charts import COLORS, Chart, StaggeredCharts, make_curve

# Reward functions' curves, in the order the functions came (the total reward is COLORS["smooth"]).
FUNCTION_COLORS = [(230, 120, 40), (40, 160, 120), (150, 90, 200), (200, 70, 90), (120, 120, 120), (180, 150, 30)]
BAND = (30, 90, 200, 50)  # the spread around the mean reward
# The least top of a chart's scale: a KL or clipped fraction of 1e-13 (rounding) reads as the zero it is, not as a
# curve filling the chart.
SMALLEST_TOP = {"chart_kl": 0.01, "chart_clip": 0.01}
HELD_OUT = "eval_reward"  # GRPO's evaluation figure: the greedy answers to the held-out prompts, mean total reward


class RLCharts(StaggeredCharts):
    """GRPO's figures (``state.figures``) and a reward model's (``state.eval_figures``, else the evaluations'
    reward_accuracy / reward_margin columns) as charts; subscribes to the :class:`RunState`."""

    def __init__(self, state: RunState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.reward = Chart("Reward: mean ± spread, per function", self, legend=True)
        self.reward.setObjectName("chart_reward")
        text = self.palette().color(QPalette.ColorRole.Text)  # legends in the text's colour (pyqtgraph's grey is faint)
        self.reward.getPlotItem().legend.setLabelTextColor(text)
        self.reward.add("reward", "total", "smooth", width=2)
        # each evaluation: the greedy answers to the held-out prompts, scored (GRPO's eval_reward)
        self.reward.add(HELD_OUT, "held-out (greedy)", "eval", width=2, symbol="o")
        self.band_hi = self.reward.add("band_hi", "", "raw", width=0.5)
        self.band_lo = self.reward.add("band_lo", "", "raw", width=0.5)
        self.band = pg.FillBetweenItem(self.band_hi, self.band_lo, brush=pg.mkBrush(*BAND))
        self.reward.addItem(self.band)
        legend = self.reward.getPlotItem().legend
        for item in (self.band_hi, self.band_lo):
            legend.removeItem(item)
        self.reward.headroom = 0.5  # the legend's row stays clear of rewards at their top (a verifier's 1.0)
        self.kl = Chart("KL to the reference", self, from_zero=True)
        self.kl.setObjectName("chart_kl")
        self.kl.add("kl", "kl", "lr")
        self.length = Chart("Answer length (tokens)", self, from_zero=True)
        self.length.setObjectName("chart_length")
        self.length.add("completion_length", "tokens", "tps")
        self.clip = Chart("Clipped fraction", self, from_zero=True)
        self.clip.setObjectName("chart_clip")
        self.clip.add("clip_fraction", "clipped", "grad")
        self.reward_model = Chart("Reward model: held-out accuracy and gap", self, legend=True)
        self.reward_model.setObjectName("chart_reward_model")
        self.reward_model.getPlotItem().legend.setLabelTextColor(text)
        self.reward_model.add("accuracy", "pair accuracy", "acc", width=2, symbol="o")
        self.reward_model.add("gap", "reward gap", "margin", width=2, symbol="o", dash=True)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.reward, 0, 0, 1, 3)
        grid.addWidget(self.kl, 1, 0)
        grid.addWidget(self.length, 1, 1)
        grid.addWidget(self.clip, 1, 2)
        grid.addWidget(self.reward_model, 2, 0, 1, 3)
        self.grpo_charts = [self.reward, self.kl, self.length, self.clip]
        self.charts = [*self.grpo_charts, self.reward_model]
        self._functions: list[str] = []
        self._visibility()
        self._start_redraws(state)

    # --- what is shown ---------------------------------------------------------------
    @property
    def has_grpo(self) -> bool:
        return self.state.figures.has_rl or self.objective in SAMPLING_OBJECTIVES

    @property
    def has_reward_model(self) -> bool:
        return self.objective == "reward" or self.state.eval_figures.first_of(ACCURACY_KEYS) is not None

    @property
    def has_any(self) -> bool:
        return self.has_grpo or self.has_reward_model

    @property
    def objective(self) -> str:
        return str(self.state.info.config.get("objective") or "")

    def _visibility(self) -> None:
        grpo, rm = self.has_grpo, self.has_reward_model
        for chart in self.grpo_charts:
            if chart.isHidden() == grpo:
                chart.setVisible(grpo)
        if self.reward_model.isHidden() == rm:
            self.reward_model.setVisible(rm)

    def _sync_functions(self) -> None:
        """A curve for each reward function, added as the functions first appear (a new run: none)."""
        names = self.state.figures.reward_functions()
        if names == self._functions:
            return
        for old in self._functions:
            curve = self.reward.curves.pop(REWARD_PREFIX + old, None)
            if curve is not None:
                self.reward.getPlotItem().removeItem(curve)
        for i, name in enumerate(names):
            color = FUNCTION_COLORS[i % len(FUNCTION_COLORS)]
            self.reward.curves[REWARD_PREFIX + name] = make_curve(
                self.reward.getPlotItem(), color, name, width=1.5, dash=True
            )
        self._functions = list(names)

    # --- redrawing -------------------------------------------------------------------
    def _empty(self) -> bool:
        return not self.state.figures.n and not self.state.eval_figures.n

    def _update(self, chart: Chart) -> None:
        f = self.state.figures
        x = f.steps()
        if chart is self.reward:
            self._sync_functions()
            mean, std = f.column("reward"), f.column("reward_std")
            spread = np.where(np.isfinite(std), std, 0.0)
            for key, curve in chart.curves.items():
                if key == "band_hi":
                    curve.setData(x, mean + spread)
                elif key == "band_lo":
                    curve.setData(x, mean - spread)
                elif key == HELD_OUT:
                    ef = self.state.eval_figures
                    if HELD_OUT in ef.names:
                        curve.setData(ef.steps(), ef.column(HELD_OUT))
                else:
                    curve.setData(x, f.column(key))
        elif chart is self.reward_model:
            steps, acc, gap = self._reward_model_series()
            chart.curves["accuracy"].setData(steps, acc)
            chart.curves["gap"].setData(steps, gap)
        else:
            for key, curve in chart.curves.items():
                curve.setData(x, f.column(key))
        chart.fit(self.state.info.total_steps or None, SMALLEST_TOP.get(chart.objectName()))
        self.redraws += 1

    def _reward_model_series(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Held-out accuracy and gap by evaluation: the objective's own names, else the evaluations' DPO-named
        columns (reward_accuracy, reward_margin)."""
        ef: StepFigures = self.state.eval_figures
        acc_key, gap_key = ef.first_of(ACCURACY_KEYS), ef.first_of(GAP_KEYS)
        if acc_key is not None or gap_key is not None:
            steps = ef.steps()
            acc = ef.column(acc_key) if acc_key else np.full(len(steps), np.nan)
            gap = ef.column(gap_key) if gap_key else np.full(len(steps), np.nan)
            return steps, acc, gap
        e = self.state.eval
        return e.column("step"), e.column("reward_accuracy"), e.column("reward_margin")


__all__ = ["COLORS", "RLCharts"]
