"""What every reward function shares: its call contract, its error, and the check on what it returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# TRL's reward-function contract: ``fn(prompts=[...], completions=[...], **columns) -> list[float]``, one float per
# completion. ``columns`` are the dataset's other columns, one value per completion, by column name.
RewardFn = Callable[..., list[float]]


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names the function and what to change."""

    def __init__(self, name: str, message: str):
        super().__init__(f"reward {name!r}: {message}")
        self.name = name
        self.reason = message


def check_scores(name: str, scores: Any, count: int) -> list[float]:
    """``scores`` as a list of ``count`` finite floats, or :class:`RewardError` saying what was wrong with them."""
    if not isinstance(scores, (list, tuple)):
        raise RewardError(name, f"must return a list of numbers (one per completion), not {type(scores).__name__}")
    if len(scores) != count:
        raise RewardError(
            name, f"returned {len(scores)} score(s) for {count} completion(s); return exactly one number per completion"
        )
    out: list[float] = []
    for i, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardError(
                name,
                f"score {i} is {value!r} ({type(value).__name__}); return a number for every completion "
                "(0.0 where it does not apply)",
            )
        try:
            number = float(value)
        except OverflowError:
            raise RewardError(name, f"score {i} is too large for a float; keep scores in a small range") from None
        if not math.isfinite(number):
            raise RewardError(name, f"score {i} is {number}; return finite numbers (no NaN or infinity)")
        out.append(number)
    return out
