"""What ``engine pairs import|export|stats --json`` answers: one typed event each, on one JSON line.

The engine writes :class:`PairsImported`, :class:`PairsExported` or :class:`PairsStats` as an event of
:mod:`core.protocol.events` (``{"v": 1, "type": "pairs_imported", ...}``), or a ``failed`` event when the input
cannot be used; the studio reads them through the same job wrapper as every other engine answer
(``studio.services.jobs.EngineJob``) with :func:`core.protocol.events.parse_event`. The field names are the keys the
JSON summary had before it was typed, so a reader of the plain object keeps working. Unknown fields are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event


@dataclass(frozen=True)
class PairsImported(Event):
    """A preference data file added to the store: pairs already there are not added again."""

    type: ClassVar[str] = "pairs_imported"
    file: str
    format: str  # the layout the reader found (trl, hh, ultrafeedback, ...)
    pairs: int  # usable pairs in the file
    added: int  # new to the store
    unchanged: int  # already in the store with the same decision
    changed: int  # already in the store with another decision (now this one)
    dropped: dict[str, int] = field(default_factory=dict)  # why rows were left out -> how many


@dataclass(frozen=True)
class PairsExported(Event):
    """The store's pairs frozen as a snapshot and written for TRL or LLaMA-Factory; its fields are also the
    export folder's ``snapshot.json``."""

    type: ClassVar[str] = "pairs_exported"
    snapshot: str  # its id: ``dataset: pairs:<id>`` trains on exactly these pairs
    format: str  # trl | trl-conversational | llama-factory
    file: str  # the data file's name inside the export folder
    pairs: int  # pairs written
    left_out: dict[str, int] = field(default_factory=dict)  # decision -> comparisons with no preferred side
    dropped: dict[str, int] = field(default_factory=dict)  # why pairs were not written -> how many
    created_at: float = 0.0  # when the snapshot was taken (seconds since the epoch)


@dataclass(frozen=True)
class PairsStats(Event):
    """What the preference store holds."""

    type: ClassVar[str] = "pairs_stats"
    prompts: int
    candidates: int
    comparisons: int
    decisions: dict[str, int]  # decision -> comparisons
    pairs: int  # comparisons with a preferred side (DPO pairs)
    edits: int
    decision_changes: int
    annotators: int
    snapshots: int


for _cls in (PairsImported, PairsExported, PairsStats):
    EVENT_TYPES[_cls.type] = _cls
