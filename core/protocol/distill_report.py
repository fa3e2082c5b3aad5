"""What ``engine prune --json`` and ``engine demo --distill --json`` answer.

:class:`PruneReport` (``{"v": 1, "type": "prune_report", ...}``): the pruned model's folder, the layers kept (their
numbers in the source model), the MLP width before and after, the parameter counts, and, when the layers were chosen
on data, each greedy round's dropped layer and the change it left (``measure``: ``kl`` or ``hidden``).

:class:`DemoDistillReport` (``"demo_distill_report"``): the demo task's held-out score and generation speed (new
tokens per second, greedy, one prompt at a time) of the teacher, the pruned student before distillation and after it.
Unknown fields are ignored, as for every event.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError


@dataclass(frozen=True)
class PruneReport(Event):
    type: ClassVar[str] = "prune_report"
    out: str = ""
    source: str = ""
    kept_layers: tuple[int, ...] = ()
    num_layers_before: int = 0
    intermediate_before: int = 0
    intermediate_after: int = 0
    params_before: int = 0
    params_after: int = 0
    measure: str = ""  # "kl" or "hidden" when the layers were chosen on data; "" for a chosen set
    rounds: tuple[dict[str, Any], ...] = ()  # {"dropped": layer, "change": the measure with it gone}
    seconds: float = 0.0

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> PruneReport:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in names}
            kwargs["kept_layers"] = tuple(int(i) for i in kwargs.get("kept_layers", ()))
            kwargs["rounds"] = tuple(dict(r) for r in kwargs.get("rounds", ()))
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


@dataclass(frozen=True)
class ModelFigures:
    """One model's held-out score on the demo task and its generation speed."""

    exact: float  # share of exactly right answers
    valid: float  # share of answers in the required format
    n: int
    tokens_per_s: float  # new tokens per second, greedy, batch of one
    tokens_per_cpu_s: float = 0.0  # the same per CPU second of the process (steadier on a busy machine)
    layers: int = 0
    params: int = 0


@dataclass(frozen=True)
class DemoDistillReport(Event):
    type: ClassVar[str] = "demo_distill_report"
    eval_prompts: int = 0
    teacher: ModelFigures | None = None
    student_before: ModelFigures | None = None  # the pruned student, not yet distilled
    student_after: ModelFigures | None = None
    kept_layers: tuple[int, ...] = ()
    teacher_run: str = ""
    distill_run: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DemoDistillReport:
        names = {f.name for f in dataclasses.fields(cls)}
        figures = ("teacher", "student_before", "student_after")
        try:
            kwargs = {k: v for k, v in data.items() if k in names}
            for name in figures:
                if kwargs.get(name) is not None:
                    kwargs[name] = ModelFigures(**kwargs[name])
            kwargs["kept_layers"] = tuple(int(i) for i in kwargs.get("kept_layers", ()))
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


EVENT_TYPES.update({cls.type: cls for cls in (PruneReport, DemoDistillReport)})
