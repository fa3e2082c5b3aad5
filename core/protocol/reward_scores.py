"""What ``engine reward score --json`` answers: a reward model's score of each (prompt, answer).

One :class:`RewardScores` event of :mod:`core.protocol.events` (``{"v": 1, "type": "reward_scores", ...}``) on one
JSON line, or a ``failed`` event saying why there is none. ``items`` keep the order of the input; a score is the
reward model's scalar for the answer (higher is better; only differences between scores mean something).
Unknown fields are ignored, as for every event.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError


@dataclass(frozen=True)
class ScoredAnswer:
    """One answer to a prompt and its score."""

    prompt: str
    completion: str
    score: float

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> ScoredAnswer:
        prompt, completion, score = data.get("prompt"), data.get("completion"), data.get("score")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError("each item needs a string 'prompt' and 'completion'")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise TypeError("each item needs a finite number 'score'")
        return cls(prompt=prompt, completion=completion, score=float(score))


@dataclass(frozen=True)
class RewardScores(Event):
    type: ClassVar[str] = "reward_scores"
    model: str = ""  # the reward model's folder
    base_model: str = ""  # the base it was loaded on
    items: tuple[ScoredAnswer, ...] = ()

    @property
    def scores(self) -> list[float]:
        return [item.score for item in self.items]

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> RewardScores:
        """Build from a decoded JSON object (``v`` and ``type`` already checked); ProtocolError if malformed."""
        try:
            rows = data.get("items") or []
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise TypeError("items must be a list of objects")
            names = {f.name for f in dataclasses.fields(cls)} - {"items"}
            plain = {k: v for k, v in data.items() if k in names}
            if not all(isinstance(v, str) for v in plain.values()):
                raise TypeError("model and base_model must be text")
            return cls(items=tuple(ScoredAnswer.from_fields(r) for r in rows), **plain)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


EVENT_TYPES[RewardScores.type] = RewardScores
