"""The worker's event protocol: typed, frozen events as JSON lines.

The engine writes one JSON object per line on stdout; the studio reads them.
Every object has ``"v"`` (the protocol version) and ``"type"``. Unknown fields
are ignored on reading so that an older studio can read a newer engine's
optional extras; a missing required field or an unknown type is a
:class:`ProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

# The reports defined in modules of their own register their events on import; importing them here is what makes
# parse_event know every event of the protocol.
from finetune_studio.core.protocol import (  # noqa: F401 - each registers its events
    dataset_report,
    demo_report,
    device_report,
    distill_report,
    memory_report,
    methods_lab,
    pairs_report,
    reward_scores,
    rollouts,
    run_lineage,
)
from finetune_studio.core.protocol.message import (
    EVENT_TYPES,
    PROTOCOL_VERSION,
    Event,
    ProtocolError,
    load_message,
    parse_message,
)
from finetune_studio.core.run_status import RunStatus

__all__ = ["EVENT_TYPES", "PROTOCOL_VERSION", "Event", "ProtocolError", "load_message", "parse_event"]


class FailureKind(StrEnum):
    """What kind of problem ended a command: what a person should look at. The values are the strings the
    ``failed`` event and the ``runs.error_kind`` column have always held."""

    CONFIG = "config"  # the settings (or the request) cannot work
    DATA = "data"  # the dataset cannot be used
    MODEL = "model"  # the model cannot be found, converted or loaded
    OOM = "oom"  # the device ran out of memory
    DATABASE = "database"  # the studio's database cannot be written or is damaged
    CANCELLED = "cancelled"  # stopped on request before it was done (nothing left behind)
    ERROR = "error"  # anything else (a bug, a crash)

    @classmethod
    def parse(cls, value: str | None) -> FailureKind:
        """The member for a stored or received string; an unknown one (a newer engine's) is ERROR."""
        try:
            return cls(value or cls.ERROR)
        except ValueError:
            return cls.ERROR


@dataclass(frozen=True)
class Started(Event):
    """The run has a database row and a folder; training is about to begin."""

    type: ClassVar[str] = "started"
    run_id: str
    run_dir: str
    total_steps: int
    device: str = "cpu"
    resumed_from_step: int = 0
    trainable_params: int = 0
    total_params: int = 0
    memory_budget_bytes: int = 0  # the estimate made before the run
    memory_total_bytes: int = 0  # what the device has
    world_size: int = 1  # processes (GPUs) training together; memory figures are per process
    parent_run_id: str = ""  # the run whose adapter this one started from (init_adapter)
    pairs_snapshot: str = ""  # the preference-store snapshot a DPO run trains on (dataset: pairs:...)


@dataclass(frozen=True)
class Progress(Event):
    """Slow set-up work (model conversion, tokenising, reference log-probs)."""

    type: ClassVar[str] = "progress"
    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Step(Event):
    """One optimizer step. DPO steps also carry reward statistics; other objectives their own ``metrics``."""

    type: ClassVar[str] = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    memory_used_bytes: int
    memory_peak_bytes: int
    epoch: float = 0.0
    elapsed_s: float = 0.0
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    # an objective's own figures, by name (the reward_* are DPO's)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Eval(Event):
    """Loss on the held-out split."""

    type: ClassVar[str] = "eval"
    step: int
    eval_loss: float
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    # an objective's own figures, by name (the reward_* are DPO's)
    metrics: dict[str, float] = field(default_factory=dict)
    # With early stopping: the best eval loss so far, its step, and whether this evaluation is it.
    best_eval_loss: float | None = None
    best_step: int | None = None
    is_best: bool = False


@dataclass(frozen=True)
class Sample(Event):
    """What the model answers (greedy, short) to a few fixed validation prompts, at one evaluation."""

    type: ClassVar[str] = "sample"
    step: int
    prompts: list[str]  # the last user turn of each prompt
    answers: list[str]  # the model's answer to each, in order


@dataclass(frozen=True)
class CheckpointSaved(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class Log(Event):
    """A human-readable line worth showing in the app's log view."""

    type: ClassVar[str] = "log"
    level: str
    message: str


@dataclass(frozen=True)
class Finished(Event):
    """The run ended normally: completed, or stopped on request (resumable)."""

    type: ClassVar[str] = "finished"
    run_id: str
    status: RunStatus  # COMPLETED or STOPPED
    step: int
    final_loss: float | None = None
    adapter_dir: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str = ""  # with early stopping: the adapter folder of the best evaluation
    best_step: int | None = None
    stopped_early: bool = False  # the eval loss stopped improving before the last step

    def __post_init__(self) -> None:
        status = RunStatus(self.status)  # a string from JSON; ValueError for one that is no run status
        if status not in (RunStatus.COMPLETED, RunStatus.STOPPED):
            raise ValueError(f"a finished run is completed or stopped, not {status.value!r}")
        object.__setattr__(self, "status", status)


@dataclass(frozen=True)
class Failed(Event):
    """The run could not go on. ``message`` tells a person what to change."""

    type: ClassVar[str] = "failed"
    message: str
    kind: FailureKind = FailureKind.ERROR
    run_id: str = ""
    detail: str = ""  # the exception text, for the log view

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FailureKind.parse(self.kind))


@dataclass(frozen=True)
class ModelReady(Event):
    """A model resolved (and converted if it came as GGUF) into a loadable safetensors folder."""

    type: ClassVar[str] = "model"
    name: str
    path: str
    architecture: str = ""
    parameters: int = 0
    layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    context_length: int = 0
    dtype: str = ""
    # counted on the meta device for one method (``model info --config``); 0 when not counted
    total_params: int = 0  # base + adapters
    trainable_params: int = 0
    quantizable_params: int = 0  # weights NF4 would quantise
    optimizer_8bit_bytes: int = 0
    counted_for: str = ""  # "lora r=16 all-linear": the method, rank and targets counted


@dataclass(frozen=True)
class ExportResult(Event):
    """An export was written and checked in a fresh process (details in ``check.json`` in its folder)."""

    type: ClassVar[str] = "export"
    run_id: str
    path: str
    passed: bool  # every written form reloaded and answered like the trained model
    verdict: str  # one line for a person
    checkpoint: str = ""  # "final", "step-000050"
    formats: list[str] = field(default_factory=list)  # "adapter", "merged", "gguf-q8_0", "ollama"
    sample: str = ""  # the trained model's answer to the check's prompt
    report_file: str = ""


EVENT_TYPES.update(
    {
        cls.type: cls
        for cls in (
            Started,
            Progress,
            Step,
            Eval,
            Sample,
            CheckpointSaved,
            Log,
            Finished,
            Failed,
            ModelReady,
            ExportResult,
        )
    }
)


def parse_event(line: str | bytes) -> Event:
    """Parse one JSON line into its event class: any event of this protocol, the reports of the modules imported
    above included."""
    return parse_message(line)
