"""The memory budget of one run as a typed, versioned message: what ``engine estimate`` prints, what a run
stores beside its measured peak, and what the studio shows.

``memory_report(shape, config, device, lengths, counts)`` turns ``core.memory.estimate``'s estimate into six
components that sum to ``total_bytes``, a verdict against the device, the lengths assumed, and the cheapest
change that would make the run fit (``cheapest_change``). Pure Python.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import (
    DataLengths,
    MemoryEstimate,
    ModelShape,
    ParamCounts,
    fits,
)
from finetune_studio.core.memory.parallel import estimate_per_process_memory
from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError

REPORT_VERSION = 1
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
VERDICTS = ("fits", "tight", "does not fit", "unknown")
TIGHT_SHARE = 0.85  # an estimate above 85% of the device is tight: the engine then runs the longest batch first

# core.memory.estimate's terms -> the report's components
_GROUPS = {
    "weights": ("base_weights", "adapter_weights"),
    "gradients": ("gradients",),
    "optimizer": ("optimizer_states",),
    "activations": ("activations", "rollouts"),
    "logits": ("logits", "reference_forward"),
    "overhead": ("runtime_overhead", "allocator_slack"),
}


@dataclass(frozen=True)
class AssumedLengths:
    """The batch the estimate is for (see ``core.memory.estimate.batch_lengths``)."""

    rows: int
    seq: int
    trained_tokens: int
    fitted: bool  # True: the longest batch of the data; False: the worst case (no dataset)
    description: str


@dataclass(frozen=True)
class MemoryReport(Event):
    """A run's memory budget. ``components`` (bytes) sum to ``total_bytes``.

    Versioned on its own (``v``, :data:`REPORT_VERSION`): it is stored in the database beside the measured peak
    (``runs.memory_estimate``) as well as sent as the ``memory_report`` event that ``engine estimate --json``
    answers. Rows stored before it had a ``type`` read back alike."""

    type: ClassVar[str] = "memory_report"
    total_params: int
    trainable_params: int
    total_bytes: int
    components: dict[str, int]
    device_kind: str
    device_name: str
    device_bytes: int  # what the device has free (0: unknown)
    verdict: str  # one of VERDICTS
    message: str  # the sentence the GUI shows
    lengths: AssumedLengths
    cheapest_change: str  # '' when it fits; else the change that makes it fit, or why none does
    params_source: str = "formula"  # 'formula' (config.json) or 'meta' (counted by the engine)
    compute_dtype: str = ""
    terms: dict[str, int] = field(default_factory=dict)  # core.memory.estimate's finer terms
    notes: tuple[str, ...] = ()
    v: int = REPORT_VERSION

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")
        if sum(self.components.values()) != self.total_bytes:
            raise ValueError("memory report: the components do not sum to total_bytes")

    @property
    def tight(self) -> bool:
        """Within ``TIGHT_SHARE`` of the device, or over it."""
        return self.device_bytes > 0 and self.total_bytes > TIGHT_SHARE * self.device_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        d["type"] = self.type
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryReport:
        if not isinstance(d, dict) or d.get("v") != REPORT_VERSION:
            raise ValueError(f"not a version-{REPORT_VERSION} memory report")
        names = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in d.items() if k in names}
        body["lengths"] = AssumedLengths(**body["lengths"])
        body["notes"] = tuple(body.get("notes") or ())
        return cls(**body)

    @classmethod
    def from_json(cls, text: str) -> MemoryReport:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> MemoryReport:
        """Build from a decoded event (``v`` and ``type`` already checked); ProtocolError if malformed."""
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


EVENT_TYPES[MemoryReport.type] = MemoryReport


def components(estimate: MemoryEstimate) -> dict[str, int]:
    terms = estimate.terms
    return {name: sum(terms[t] for t in parts) for name, parts in _GROUPS.items()}


def memory_report(
    shape: ModelShape,
    config: TrainConfig,
    device: DeviceInfo,
    lengths: DataLengths | None = None,
    counts: ParamCounts | None = None,
    world_size: int = 1,
) -> MemoryReport:
    """With ``world_size`` processes (``train --nproc N``, ``config.parallelism``), every figure is one process's
    (``core.memory.parallel``), against one GPU."""
    est = estimate_per_process_memory(shape, config, device, world_size, config.parallelism, lengths, counts)
    verdict = fits(est, device, config=config)
    have = device.available_bytes
    word = "unknown" if have <= 0 else "does not fit" if not verdict.fits else "tight" if verdict.tight else "fits"
    change = "" if word in ("fits", "unknown") else cheapest_change(shape, config, device, lengths, counts, world_size)
    batch = est.batch
    assert batch is not None
    return MemoryReport(
        total_params=est.total_params,
        trainable_params=est.trainable_params,
        total_bytes=est.total_bytes,
        components=components(est),
        device_kind=device.kind,
        device_name=device.name,
        device_bytes=max(0, have),
        verdict=word,
        message=verdict.message,
        lengths=AssumedLengths(batch.rows, batch.seq, batch.trained_tokens, batch.fitted, batch.description),
        cheapest_change=change,
        params_source=est.params_source,
        compute_dtype=est.compute_dtype,
        terms=est.terms,
        notes=est.notes,
    )


def _candidates(config: TrainConfig) -> Iterator[tuple[str, TrainConfig]]:
    """Changes in rising order of cost: (what to tell a person, the changed config). The same effective batch
    (batch_size x accumulation) first: it changes nothing in what is learnt, only the speed."""
    c = config
    if c.optimizer in ("adamw", "paged_adamw"):
        yield "use 8-bit AdamW (optimizer: adamw_8bit)", c.replace(optimizer="adamw_8bit")
    for b, acc in _smaller_batches(c):
        yield (
            f"lower batch_size to {b} with gradient_accumulation_steps {acc} (the same effective batch)",
            c.replace(batch_size=b, gradient_accumulation_steps=acc),
        )
    if not c.gradient_checkpointing:
        ckpt = c.replace(gradient_checkpointing=True)
        yield "enable gradient checkpointing (about 30% slower)", ckpt
        for b, acc in _smaller_batches(c):
            yield (
                f"enable gradient checkpointing and lower batch_size to {b} with gradient_accumulation_steps {acc}",
                ckpt.replace(batch_size=b, gradient_accumulation_steps=acc),
            )
    if c.method in ("lora", "dora"):
        q = c.replace(method="qlora" if c.method == "lora" else "qdora", gradient_checkpointing=True, batch_size=1)
        yield f"use {q.method.upper()} (4-bit base) with gradient checkpointing and batch_size 1", q
    n = c.max_length
    while n > 64:
        n //= 2
        yield (
            f"lower max_length to {n} (longer rows are truncated), batch_size 1, gradient checkpointing",
            c.replace(max_length=n, batch_size=1, gradient_checkpointing=True),
        )


def _smaller_batches(c: TrainConfig) -> Iterator[tuple[int, int]]:
    """Halved batch sizes down to 1, each with the accumulation that keeps (at least) the effective batch."""
    b = c.batch_size
    while b > 1:
        b //= 2
        yield b, -(-c.batch_size * c.gradient_accumulation_steps // b)


def cheapest_change(
    shape: ModelShape,
    config: TrainConfig,
    device: DeviceInfo,
    lengths: DataLengths | None = None,
    counts: ParamCounts | None = None,
    world_size: int = 1,
) -> str:
    """The first of ``_candidates`` whose estimate fits with headroom, with the total it would need."""
    for text, changed in _candidates(config):
        # same adapters: same counts
        est = estimate_per_process_memory(shape, changed, device, world_size, changed.parallelism, lengths, counts)
        verdict = fits(est, device, config=changed)
        if verdict.fits and not verdict.tight:
            return f"{text}: needs ~{est.total_bytes / 1024**3:.2f} GiB"
    return "none of the usual changes fits this device: choose a smaller model"
