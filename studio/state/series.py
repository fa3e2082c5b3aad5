"""Growable numeric columns for live curves: numpy buffers with capacity doubling.

Appending one step is O(1) amortised and a chart reads a view of the filled
part without copying, so 100,000 points cost no more per update than 100.
Pure Python + numpy: no Qt.
"""

from __future__ import annotations

import math

import numpy as np


class Columns:
    """Named float64 columns of equal length; missing values are NaN."""

    def __init__(self, names: tuple[str, ...] | list[str], capacity: int = 1024):
        self.names = tuple(names)
        self._cap = max(16, int(capacity))
        self._data = {n: np.full(self._cap, np.nan) for n in self.names}
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def _grow(self, need: int) -> None:
        cap = self._cap
        while cap < need:
            cap *= 2
        for name, old in self._data.items():
            new = np.full(cap, np.nan)
            new[: self.n] = old[: self.n]
            self._data[name] = new
        self._cap = cap

    def append(self, **values: float | None) -> None:
        if self.n >= self._cap:
            self._grow(self.n + 1)
        i = self.n
        for name in self.names:
            v = values.get(name)
            self._data[name][i] = np.nan if v is None else float(v)
        self.n += 1

    def extend(self, rows: list[dict]) -> None:
        """Append many rows at once (loading a past run's history)."""
        if not rows:
            return
        if self.n + len(rows) > self._cap:
            self._grow(self.n + len(rows))
        for name in self.names:
            col = np.array([r.get(name) for r in rows], dtype=float)  # None becomes NaN
            self._data[name][self.n : self.n + len(rows)] = col
        self.n += len(rows)

    def column(self, name: str) -> np.ndarray:
        """A read-only view of the filled part of ``name``."""
        view = self._data[name][: self.n]
        view.flags.writeable = False
        return view

    def last(self, name: str) -> float | None:
        if not self.n:
            return None
        v = self._data[name][self.n - 1]
        return None if math.isnan(v) else float(v)

    def truncate_after(self, step_column: str, step: int) -> None:
        """Drop rows whose ``step_column`` is above ``step`` (a resumed run re-trains them)."""
        steps = self._data[step_column][: self.n]
        keep = int(np.searchsorted(steps, step, side="right")) if self.n else 0
        for col in self._data.values():
            col[keep : self.n] = np.nan
        self.n = keep

    def clear(self) -> None:
        for col in self._data.values():
            col[: self.n] = np.nan
        self.n = 0


class Ema:
    """Debiased exponential moving average (TensorBoard's smoothing): s_k = w s_{k-1} + (1 - w) x_k,
    reported as s_k / (1 - w^k) so the first points are not pulled towards 0."""

    def __init__(self, weight: float = 0.9):
        self.weight = weight
        self.reset()

    def reset(self) -> None:
        self._acc = 0.0
        self._k = 0

    def update(self, x: float | None) -> float | None:
        if x is None or not math.isfinite(x):
            return None if self._k == 0 else self._acc / (1 - self.weight**self._k)
        self._k += 1
        self._acc = self.weight * self._acc + (1 - self.weight) * x
        return self._acc / (1 - self.weight**self._k)
