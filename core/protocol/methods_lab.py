"""What ``engine methods --json`` answers: the methods lab's table, one row per method trained on the same data
and budget.

One :class:`MethodsLabReport` (``{"v": 1, "type": "methods_lab_report", ...}``) event of :mod:`core.protocol.events`
on one JSON line. Each :class:`MethodRow` is one run in the store (``run_id``), so the lab's runs overlay in Runs.
Memory "above the model" is the step's peak less the loaded base weights and the process's baseline: estimated
before the run (``core.memory.estimate``) and measured (the run's recorded peak). Unknown fields are ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError


@dataclass(frozen=True)
class MethodRow:
    """One method's run in the lab."""

    method: str
    status: str  # completed | failed | refused
    run_id: str = ""
    trainable_params: int = 0
    estimated_bytes: int = 0  # above the loaded model, estimated before the run
    measured_bytes: int = 0  # above the loaded model, measured (the run's peak)
    tokens_per_s: float = 0.0
    seconds: float = 0.0  # training time
    final_loss: float | None = None
    eval_loss: float | None = None  # held-out loss after the last step
    exact: float | None = None  # the task's score (the demo task's exact match), None without a scorer
    settings: dict[str, Any] = field(default_factory=dict)  # what this method ran with beside the shared budget
    message: str = ""  # why it failed or was refused


@dataclass(frozen=True)
class MethodsLabReport(Event):
    """``engine methods``: the chosen methods on one dataset and one step budget."""

    type: ClassVar[str] = "methods_lab_report"
    dataset: str = ""
    model: str = ""
    objective: str = "sft"
    steps: int = 0
    batch_size: int = 0
    max_length: int = 0
    scorer: str = ""  # the task score's name ('' without one)
    eval_prompts: int = 0
    device: str = ""
    rows: tuple[MethodRow, ...] = ()

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> MethodsLabReport:
        names = {f.name for f in dataclasses.fields(cls)}
        row_names = {f.name for f in dataclasses.fields(MethodRow)}
        try:
            kwargs = {k: v for k, v in data.items() if k in names}
            kwargs["rows"] = tuple(
                MethodRow(**{k: v for k, v in r.items() if k in row_names}) for r in kwargs.get("rows", ())
            )
            return cls(**kwargs)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


EVENT_TYPES.update({MethodsLabReport.type: MethodsLabReport})
