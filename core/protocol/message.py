"""The base of the JSON-line event protocol: the version, its error, the event base class and the registry of event
types that :mod:`core.protocol.events` and the report modules fill.

Standard library only; every module of the protocol builds on this one, and this one imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, cast

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A line that is not a valid message of one of the JSON-line protocols (these events, the generation worker's
    requests and replies in :mod:`core.protocol.generation`)."""


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = ""

    def to_json(self) -> str:
        body = {"v": PROTOCOL_VERSION, "type": self.type}
        body.update(dataclasses.asdict(self))
        return json.dumps(body, separators=(",", ":"), allow_nan=False, default=str)


# Every event type by its ``type`` string: filled by the modules that define events, as they are imported.
EVENT_TYPES: dict[str, type[Event]] = {}


def load_message(line: str | bytes, version: int, error: type[Exception] = ProtocolError) -> dict[str, Any]:
    """One JSON-line message of a versioned protocol as a dict; ``error`` (:class:`ProtocolError` unless told) says
    why not: not JSON, not an object, or another version."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"not JSON: {line[:120]!r} ({exc.msg})") from None
    if not isinstance(data, dict):
        raise error(f"not a JSON object: {line[:120]!r}")
    if data.get("v") != version:
        raise error(f"protocol version {data.get('v')!r}, expected {version}")
    return data


def parse_message(line: str | bytes) -> Event:
    """Parse one JSON line into its registered event class (:data:`EVENT_TYPES`)."""
    data = load_message(line, PROTOCOL_VERSION)
    cls = EVENT_TYPES.get(data.get("type", ""))
    if cls is None:
        raise ProtocolError(f"unknown event type {data.get('type')!r}")
    if hasattr(cls, "from_fields"):  # events with nested dataclasses build themselves
        return cast(Event, cls.from_fields(data))
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {cls.type} event: {exc}") from None
