"""The devices a run can use, as the engine's torch sees them: what ``engine devices --json`` answers.

``core.devices`` finds GPUs without torch (``nvidia-smi``), which is quick but does not know what a run will
get: ``CUDA_VISIBLE_DEVICES``, a CPU-only torch build on a GPU machine. The engine answers with one
:class:`DeviceReport` event (``{"v": 1, "type": "device_report", ...}``, :mod:`core.protocol.events`): the CUDA GPUs
torch
can use, an Apple GPU, and the CPU last. The studio offers several processes (``train --nproc N``) when the
report has more than one GPU. Unknown fields are ignored, as for every event.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError
from finetune_studio.core.protocol.message import parse_message as parse_event

SOURCES = ("torch", "nvidia-smi")


@dataclass(frozen=True)
class DeviceReport(Event):
    """GPUs first (CUDA by index, then MPS), the CPU last."""

    type: ClassVar[str] = "device_report"
    devices: tuple[DeviceInfo, ...] = ()
    source: str = "torch"  # who counted the GPUs: 'torch' (what a run gets) or 'nvidia-smi'
    torch_version: str = ""
    cuda_version: str = ""  # torch's CUDA build ('' for a CPU-only build)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {self.source!r}")

    @property
    def gpus(self) -> tuple[DeviceInfo, ...]:
        """The CUDA GPUs: one process each with ``train --nproc N``."""
        return tuple(d for d in self.devices if d.kind == "cuda")

    @property
    def max_processes(self) -> int:
        """How many processes a run can have on this machine: one per CUDA GPU, at least 1."""
        return max(1, len(self.gpus))

    @property
    def several_gpus(self) -> bool:
        return len(self.gpus) > 1

    @property
    def best(self) -> DeviceInfo | None:
        """The device a one-process run trains on (the first), or None for an empty report."""
        return self.devices[0] if self.devices else None

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DeviceReport:
        """Build from a decoded JSON object (``v`` and ``type`` already checked); ProtocolError if malformed."""
        names = {f.name for f in dataclasses.fields(DeviceInfo)}
        try:
            raw = data.get("devices") or []
            if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
                raise TypeError("devices must be a list of objects")
            devices = tuple(DeviceInfo(**{k: v for k, v in d.items() if k in names}) for d in raw)
            return cls(
                devices=devices,
                source=str(data.get("source", "torch")),
                torch_version=str(data.get("torch_version", "")),
                cuda_version=str(data.get("cuda_version", "")),
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None

    @classmethod
    def from_json(cls, line: str | bytes) -> DeviceReport:
        report = parse_event(line)
        if not isinstance(report, DeviceReport):
            raise ProtocolError(f"expected a {cls.type} event, got {report.type!r}")
        return report


EVENT_TYPES[DeviceReport.type] = DeviceReport
