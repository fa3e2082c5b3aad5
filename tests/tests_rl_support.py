"""Rollouts events for the studio's tests: the engine's ``rollouts`` event (core.protocol.rollouts) when it exists,
else an object with the same fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class _RolloutsLike:
    type: ClassVar[str] = "rollouts"
    step: int
    items: list[dict[str, Any]]


def rollouts_event(step: int, items: list[dict[str, Any]]) -> Any:
    try:
        from finetune_studio.core.protocol.rollouts import Rollouts
    except ImportError:
        return _RolloutsLike(step, items)
    return Rollouts(step=step, items=items)
