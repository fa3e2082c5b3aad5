"""Which pairs to label first, given a model's predicted rewards, and how often that model agreed with the person.

A pair to label is two answers to one prompt, ``first`` and ``second``; a scorer (a reward model, or a DPO adapter's
implicit reward beta * sum log pi / pi_ref over the answer's tokens) predicts a reward for each, and the pair's
*margin* is ``reward(first) - reward(second)``: positive when the model prefers the first answer. The orders:

* ``added``: the order the pairs were made in (no scores needed);
* ``random``: a shuffle that is the same each time for a seed, and keeps the pairs' relative order when more are
  added (each pair's place comes from a hash of its key and the seed);
* ``least_sure``: the smallest ``|margin|`` first: the pairs the model is closest to a tie on, where a person's
  label teaches it most;
* ``largest_gap``: the largest ``|margin|`` first: the pairs the model is most sure about (quick to confirm, and
  where its mistakes are the most telling).

Pairs without a margin (not scored yet, or a scorer that failed on them) follow the scored ones in the order they
were added. The app's queue and ``benchmarks/annotate_order.py`` both order with :func:`order`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Order = Literal["added", "random", "least_sure", "largest_gap"]
ORDERS: dict[Order, str] = {
    "added": "As added",
    "random": "Random",
    "least_sure": "Least sure first",
    "largest_gap": "Largest predicted gap first",
}
NEEDS_SCORES: tuple[Order, ...] = ("least_sure", "largest_gap")
LAST_DECISIONS = 20  # the agreement line looks back this many decisions at most


def parse_order(value: str) -> Order:
    """``value`` as an :data:`Order`; ValueError naming the choices otherwise."""
    for name in ORDERS:
        if value == name:
            return name
    raise ValueError(f"unknown queue order {value!r}: choose one of {', '.join(ORDERS)}")


def _known(margin: float | None) -> bool:
    return margin is not None and math.isfinite(margin)


def _shuffle_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}|{key}".encode()).digest()


def order(how: str, margins: Sequence[float | None], keys: Sequence[str] | None = None, seed: int = 0) -> list[int]:
    """The pairs' indices in the order to label them.

    ``margins[i]``: pair i's predicted ``reward(first) - reward(second)``, or None when it has none (NaN and
    infinities count as none). ``keys[i]``: a stable name of pair i (``random`` needs them: a pair keeps its place
    relative to the others whatever is added later); without keys, the indices are the names. Ties keep the order
    the pairs were added in.
    """
    how = parse_order(how)
    n = len(margins)
    if keys is not None and len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} pairs: give one key per pair")
    indices = list(range(n))
    if how == "added":
        return indices
    if how == "random":
        names = list(keys) if keys is not None else [str(i) for i in indices]
        return sorted(indices, key=lambda i: (_shuffle_key(seed, names[i]), i))
    scored = [i for i in indices if _known(margins[i])]
    unscored = [i for i in indices if not _known(margins[i])]
    sign = 1.0 if how == "least_sure" else -1.0
    scored.sort(key=lambda i: (sign * abs(margins[i] or 0.0), i))
    return scored + unscored


def margin(rewards: dict[str, float], first: str, second: str) -> float | None:
    """``rewards[first] - rewards[second]`` (None when either answer has no reward)."""
    a, b = rewards.get(first), rewards.get(second)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a - b


@dataclass(frozen=True)
class Agreement:
    """The model agreed with the person on ``agreed`` of their last ``decisions`` decisions."""

    agreed: int
    decisions: int

    @property
    def rate(self) -> float | None:
        return self.agreed / self.decisions if self.decisions else None

    def text(self) -> str:
        if not self.decisions:
            return "The model's agreement with you shows here after your first pick of a side."
        if self.decisions == 1:
            return f"The model {'agreed' if self.agreed else 'did not agree'} with you on your last decision."
        return f"The model agreed with you on {self.agreed} of your last {self.decisions} decisions."


def agreement(picks: Sequence[tuple[bool, float | None]], last: int = LAST_DECISIONS) -> Agreement:
    """How often the model agreed with the last ``last`` picks of a side that it had a prediction for.

    ``picks``: the person's decisions in the order they were made, each ``(first_chosen, margin)``: whether they
    chose the pair's first answer, and the model's margin for the pair (first minus second; None: no prediction,
    such a pick is not counted). The model agrees when it gave the chosen answer the higher reward; a margin of
    exactly 0 (no preference) is not agreement. Ties, both-bad and skips are not picks: leave them out.
    """
    if last < 1:
        raise ValueError(f"last must be 1 or more, not {last}")
    known = [(first, m) for first, m in picks if _known(m)]
    window = known[-last:]
    agreed = sum(1 for first, m in window if m is not None and (m > 0 if first else m < 0))
    return Agreement(agreed, len(window))
