"""What ``engine prune --json`` and ``engine demo --distill --json`` answer.

:class:`PruneReport` (``{"v": 1, "type": "prune_report", ...}``): the pruned model's folder, the layers kept (their
numbers in the source model), the MLP width before and after, the parameter counts, and, when the layers were chosen
on data, each greedy round's dropped layer and the change it left (``measure``: ``kl`` or ``hidden``).

:class:`DemoDistillReport` (``"demo_distill_report"``): the demo task's held-out score and generation speed (new
tokens per second, greedy, one prompt at a time) of the teacher, the pruned student before distillation and after it.

:class:`DistillSpeed` (``"distill_speed"``): emitted by a distillation run when it ends (``distill_measure_speed``):
greedy new tokens per second of the teacher and of the trained student, one prompt at a time, the two models taking
turns prompt by prompt, wall-clock and per CPU second of the process; their layers and parameters. The run's store
keeps it (``Store.distill_speed(run_id)``).
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


@dataclass(frozen=True)
class DistillSpeed(Event):
    """A distillation run's generation speed: its trained student beside its teacher, on the same prompts."""

    type: ClassVar[str] = "distill_speed"
    prompts: int = 0  # prompts each model answered (one at a time, the models taking turns)
    new_tokens: int = 0  # the most new tokens asked of each answer (greedy)
    teacher_tokens_per_s: float = 0.0  # new tokens per wall-clock second
    teacher_tokens_per_cpu_s: float = 0.0  # new tokens per CPU second of the process (steadier on a busy machine)
    student_tokens_per_s: float = 0.0
    student_tokens_per_cpu_s: float = 0.0
    teacher_layers: int = 0
    student_layers: int = 0
    teacher_params: int = 0
    student_params: int = 0

    # The number fields, in order: what the store keeps (``Store.distill_speed``).
    FIELDS: ClassVar[tuple[str, ...]] = (
        "prompts",
        "new_tokens",
        "teacher_tokens_per_s",
        "teacher_tokens_per_cpu_s",
        "student_tokens_per_s",
        "student_tokens_per_cpu_s",
        "teacher_layers",
        "student_layers",
        "teacher_params",
        "student_params",
    )

    @property
    def speedup(self) -> float:
        """The student's new tokens per wall-clock second over the teacher's (0 when the teacher's is unknown)."""
        return self.student_tokens_per_s / self.teacher_tokens_per_s if self.teacher_tokens_per_s > 0 else 0.0

    @property
    def speedup_cpu(self) -> float:
        """The same per CPU second."""
        if self.teacher_tokens_per_cpu_s <= 0:
            return 0.0
        return self.student_tokens_per_cpu_s / self.teacher_tokens_per_cpu_s

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DistillSpeed:
        try:
            kwargs: dict[str, Any] = {}
            for f in dataclasses.fields(cls):
                if f.name in data:
                    kind = int if f.type in ("int", int) else float
                    kwargs[f.name] = kind(data[f.name])
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


EVENT_TYPES.update({cls.type: cls for cls in (PruneReport, DemoDistillReport, DistillSpeed)})
