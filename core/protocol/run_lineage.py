"""What ``engine runs lineage RUN --json`` answers: the runs a run started from and the runs started from it.

One :class:`RunLineage` event of :mod:`core.protocol.events` (``{"v": 1, "type": "run_lineage", ...}``) on one JSON
line, or a ``failed`` event when there is no such run. ``lineage`` runs oldest first (the asked run last),
``children`` the runs whose ``init_adapter`` is the asked run. Unknown fields are ignored, as for every event.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError


@dataclass(frozen=True)
class LineageRun:
    """One run of a lineage: who it is, how far it got, and what it started from."""

    id: str
    name: str = ""
    objective: str = ""  # sft | dpo ('' for runs stored before it was recorded)
    status: str = ""  # core.run_status.RunStatus's value
    step: int = 0
    final_loss: float | None = None
    init_adapter: str = ""  # the run or adapter folder it started from
    pairs_snapshot: str = ""  # the preference-store snapshot a DPO run trained on
    parent_run_id: str = ""

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> LineageRun:
        """From a JSON object or a database row; a null column takes the field's default."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if value is not None or (f.name in data and f.default is None):
                kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class RunLineage(Event):
    type: ClassVar[str] = "run_lineage"
    lineage: tuple[LineageRun, ...] = ()
    children: tuple[LineageRun, ...] = ()

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> RunLineage:
        """Build from a decoded JSON object (``v`` and ``type`` already checked); ProtocolError if malformed."""
        try:
            parts = {}
            for name in ("lineage", "children"):
                rows = data.get(name) or []
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise TypeError(f"{name} must be a list of objects")
                parts[name] = tuple(LineageRun.from_fields(r) for r in rows)
            return cls(**parts)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


EVENT_TYPES[RunLineage.type] = RunLineage
