"""What an online RL step sampled: the :class:`Rollouts` event, one per optimizer step that sampled answers.

The engine writes it after the step's ``step`` event (``{"v": 1, "type": "rollouts", "step": 3, "items": [...]}``);
the studio shows the answers with their rewards, and the engine's reporter keeps each item in the store
(``Store.add_rollouts``). Each item is one sampled answer:

- ``prompt``: the prompt as a person reads it (its last user turn), ``completion``: the sampled answer's text;
- ``reward``: the weighted total of the reward functions, ``rewards``: each function's own score by its name;
- ``advantage``: what the update made of it (the reward against its group's), ``group``: which prompt of the step
  it answers (the ``G`` answers of one prompt share a group).

Unknown fields are ignored, as for every event; a malformed item is a :class:`ProtocolError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError

ITEM_KEYS = ("prompt", "completion", "reward", "rewards", "advantage", "group")


@dataclass(frozen=True)
class Rollouts(Event):
    """The answers sampled for one optimizer step, with their rewards and advantages (see the module)."""

    type: ClassVar[str] = "rollouts"
    step: int
    items: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Rollouts:
        """Build from a decoded JSON object (``v`` and ``type`` already checked); ProtocolError if malformed."""
        step = data.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ProtocolError(f"bad {cls.type} event: step must be a whole number of at least 0, not {step!r}")
        items = data.get("items", [])
        if not isinstance(items, list):
            raise ProtocolError(f"bad {cls.type} event: items must be a list of objects")
        return cls(step=step, items=[rollout_item(item, i) for i, item in enumerate(items)])


def rollout_item(item: Any, index: int = 0) -> dict[str, Any]:
    """One checked item of a :class:`Rollouts` event (its known keys only); ProtocolError names what is wrong."""

    def bad(message: str) -> ProtocolError:
        return ProtocolError(f"bad rollouts event: item {index}: {message}")

    if not isinstance(item, dict):
        raise bad("must be an object")
    for key in ("prompt", "completion"):
        if not isinstance(item.get(key), str):
            raise bad(f"{key} must be text")
    for key in ("reward", "advantage"):
        if not _finite(item.get(key)):
            raise bad(f"{key} must be a finite number, not {item.get(key)!r}")
    rewards = item.get("rewards", {})
    if not isinstance(rewards, dict) or not all(isinstance(k, str) and _finite(v) for k, v in rewards.items()):
        raise bad("rewards must map each reward function's name to a finite number")
    group = item.get("group")
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise bad(f"group must be a whole number of at least 0, not {group!r}")
    return {
        "prompt": item["prompt"],
        "completion": item["completion"],
        "reward": float(item["reward"]),
        "rewards": {k: float(v) for k, v in rewards.items()},
        "advantage": float(item["advantage"]),
        "group": group,
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


EVENT_TYPES[Rollouts.type] = Rollouts
