"""An objective's own figures by step (a Step's or Eval's ``metrics``: GRPO's ``reward``, ``reward/<name>``, ``kl``...),
as growable numpy columns whose names are learnt as they arrive, and which of them the Train page charts.

Qt-free: :class:`~studio.state.run.RunState` keeps one :class:`StepFigures` for the train steps and one for the
evaluations; the charts read views of their columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from finetune_studio.studio.state.series import Columns

REWARD_PREFIX = "reward/"  # GRPO: the mean of one reward function over the step's rollouts
RL_KEYS = ("reward", "reward_std", "kl", "completion_length", "clip_fraction")  # GRPO's figures beside reward/<name>
# A reward model's held-out figures at each evaluation, as its objective may name them (its own names, or DPO's).
ACCURACY_KEYS = ("accuracy", "pair_accuracy", "reward_accuracy")
GAP_KEYS = ("gap", "reward_gap", "margin", "reward_margin")


class StepFigures:
    """Named float columns keyed by step; a name seen for the first time becomes a column (NaN at earlier steps).

    A step given again (a resumed run re-trains it) drops that step and every later one first, as the run's own
    curves do."""

    def __init__(self) -> None:
        self._cols = Columns(("step",))

    @property
    def n(self) -> int:
        return self._cols.n

    @property
    def names(self) -> tuple[str, ...]:
        """The figures' names in the order they first came (``step`` left out)."""
        return self._cols.names[1:]

    def add(self, step: int, figures: Mapping[str, float | int | None]) -> None:
        self.extend({int(step): figures})

    def extend(self, by_step: Mapping[int, Mapping[str, float | int | None]]) -> None:
        """Steps in increasing order, each with its figures by name (a step without figures is left out)."""
        rows: list[dict[str, float]] = []
        for step in sorted(by_step):
            values = {k: v for k, v in ((k, _number(v)) for k, v in by_step[step].items()) if v is not None}
            values.pop("step", None)
            if values:
                rows.append({"step": float(step), **values})
        if not rows:
            return
        first = int(rows[0]["step"])
        if self.n and first <= int(self._cols.last("step") or 0):
            self.truncate_after(first - 1)
        new = [k for r in rows for k in r if k not in self._cols.names]
        if new:
            self._widen(list(dict.fromkeys(new)))
        self._cols.extend(rows)

    def _widen(self, names: list[str]) -> None:
        old = self._cols
        cols = Columns((*old.names, *names), capacity=max(16, old.n * 2))
        cols.extend([{k: float(old.column(k)[i]) for k in old.names} for i in range(old.n)])
        self._cols = cols

    def column(self, name: str) -> np.ndarray:
        """A read-only view of ``name`` (all NaN for a name never seen)."""
        if name in self._cols.names:
            return self._cols.column(name)
        return np.full(self.n, np.nan)

    def steps(self) -> np.ndarray:
        return self._cols.column("step")

    def last(self, name: str) -> float | None:
        """The latest finite value of ``name``."""
        if name not in self._cols.names:
            return None
        col = self._cols.column(name)
        finite = np.flatnonzero(np.isfinite(col))
        return float(col[finite[-1]]) if len(finite) else None

    def truncate_after(self, step: int) -> None:
        self._cols.truncate_after("step", step)

    def clear(self) -> None:
        self._cols = Columns(("step",))

    # --- what the charts show ------------------------------------------------
    def reward_functions(self) -> list[str]:
        """The reward functions' names (``reward/<name>``'s), in the order they came."""
        return [n[len(REWARD_PREFIX) :] for n in self.names if n.startswith(REWARD_PREFIX)]

    @property
    def has_rl(self) -> bool:
        """Whether these are an online RL run's figures (GRPO's total reward or a reward function's mean)."""
        return "reward" in self.names or bool(self.reward_functions())

    def first_of(self, keys: tuple[str, ...]) -> str | None:
        """The first of ``keys`` these figures hold (a reward model's accuracy may go by several names)."""
        return next((k for k in keys if k in self.names), None)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
