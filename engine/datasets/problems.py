"""Collecting per-row problems without drowning the reader.

A file with 100,000 rows that all miss the same field should produce a short report, not 100,000 lines:
:class:`ProblemLog` keeps the first few problems of each kind with their line numbers and sums up the rest.
"""

from __future__ import annotations

from collections import Counter

from finetune_studio.engine.datasets.schema import Problem

PER_KIND = 20  # problems of one kind listed one by one before the rest are summed up


class RowError(ValueError):
    """A row cannot be used; the message says why. ``kind`` groups rows that fail for the same reason."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind or message


class ProblemLog:
    """Problems found while reading one dataset, grouped by kind, plus a tally of dropped rows by reason."""

    def __init__(self, per_kind: int = PER_KIND):
        self.per_kind = per_kind
        self._listed: list[Problem] = []
        self._counts: Counter[str] = Counter()
        self._levels: dict[str, str] = {}
        self.dropped: Counter[str] = Counter()

    def add(
        self, message: str, line: int | None = None, *, file: str = "", level: str = "warning", kind: str | None = None
    ) -> None:
        """Record one problem; ``kind`` (default: the message) groups repeats of the same problem."""
        kind = kind or message
        self._counts[kind] += 1
        self._levels.setdefault(kind, level)
        if self._counts[kind] <= self.per_kind:
            self._listed.append(Problem(message, line, file, level))

    def drop(self, message: str, line: int | None = None, *, file: str = "", kind: str | None = None) -> None:
        """Record a row left out of the dataset, and why."""
        kind = kind or message
        self.dropped[kind] += 1
        self.add(message, line, file=file, level="dropped", kind=kind)

    def count(self, kind: str) -> int:
        return self._counts[kind]

    def problems(self) -> list[Problem]:
        """The listed problems, then one summary line per kind that had more than ``per_kind``."""
        out = list(self._listed)
        for kind, n in self._counts.items():
            if n > self.per_kind:
                out.append(Problem(f"... and {n - self.per_kind} more like this: {kind}", None, "", self._levels[kind]))
        return out
