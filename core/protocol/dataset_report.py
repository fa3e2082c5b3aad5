"""The dataset report: what ``engine data inspect --json`` answers, as one typed event.

The engine builds a :class:`DatasetReport` and writes it as one JSON line of the event protocol
(``{"v": 1, "type": "dataset_report", ...}``, :mod:`core.protocol.events`); the studio parses it with
:func:`core.protocol.events.parse_event` (or :meth:`DatasetReport.from_json`) and reads only these fields. A reply with
another version, another type or a field of the wrong shape is a :class:`core.protocol.events.ProtocolError`.
Unknown fields are ignored, as for every event, so that a newer engine may add optional extras.

The value types (:class:`Problem`, :class:`LengthStats`, :class:`LengthBias`, :class:`TokenStats`) are the
engine's own: ``engine.datasets`` computes with them, so there is no second copy to keep in step.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError, parse_message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass(frozen=True)
class Problem:
    """Something wrong with the data, told so a person can fix it."""

    message: str
    line: int | None = None  # 1-based line in a text file (JSONL, JSON, CSV); 1-based row (Parquet, Arrow)
    file: str = ""
    # "dropped": the row was left out; "warning": kept, but look at it; "note": information.
    level: str = "warning"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "level": self.level}
        if self.line is not None:
            out["line"] = self.line
        if self.file:
            out["file"] = self.file
        return out

    @property
    def where(self) -> str:
        """``'line 3: '`` or ``''``, to put before the message."""
        return f"line {self.line}: " if self.line else ""


@dataclass(frozen=True)
class LengthStats:
    count: int
    min: int
    median: float
    p95: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats | None:
        if not values:
            return None
        ordered = sorted(values)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
        return cls(len(ordered), ordered[0], statistics.median(ordered), p95, ordered[-1])


@dataclass(frozen=True)
class LengthBias:
    """Whether chosen answers are systematically longer than rejected ones (DPO then learns "longer is better")."""

    unit: str  # "tokens" or "characters"
    pairs: int
    mean_chosen: float
    mean_rejected: float
    chosen_longer_share: float  # share of pairs whose chosen answer is strictly longer

    @classmethod
    def of(cls, unit: str, chosen: list[int], rejected: list[int]) -> LengthBias | None:
        if not chosen:
            return None
        longer = sum(1 for c, r in zip(chosen, rejected) if c > r)
        return cls(
            unit,
            len(chosen),
            round(statistics.fmean(chosen), 1),
            round(statistics.fmean(rejected), 1),
            round(longer / len(chosen), 3),
        )


@dataclass(frozen=True)
class TokenStats:
    """Token statistics of a dataset under one tokenizer and ``max_length``."""

    max_length: int
    measured: int  # examples measured (all, or the first ``limit``)
    lengths: LengthStats | None  # full sequence lengths before truncation (pairs: the longer side)
    trained: LengthStats | None  # trained tokens per example after truncation
    over_max_length: int  # examples longer than max_length (truncated in training)
    no_trained_tokens: int  # examples left with nothing to learn after truncation
    difference_truncated: int  # pairs whose chosen and rejected only differ past max_length
    render_failures: int  # examples the chat template refuses
    length_bias: LengthBias | None = None
    # For the memory estimate (core.memory.estimate.DataLengths): the longest rows in tokens before truncation and the
    # largest trained-token counts per row, largest first, at most core.memory.estimate.LONGEST_KEPT; a DPO pair is two
    # rows.
    longest_rows: tuple[int, ...] = ()
    most_trained_rows: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive tokens that are all trained on, or all not."""

    text: str
    trained: bool
    tokens: int


@dataclass(frozen=True)
class RenderedSequence:
    """One token sequence exactly as training sees it, after the chat template."""

    text: str
    segments: tuple[Segment, ...]
    tokens: int
    trained_tokens: int
    truncated: bool = False

    def marked(self, start: str = "[[", end: str = "]]") -> str:
        """The text with each trained segment wrapped in ``start`` ... ``end`` (for terminals)."""
        return "".join(f"{start}{s.text}{end}" if s.trained else s.text for s in self.segments)


@dataclass(frozen=True)
class ExamplePreview:
    """One row: in internal form always; rendered as tokens when a tokenizer was at hand.

    SFT and text rows render as ``sequence``; a preference pair as ``chosen`` and ``rejected``, which share
    ``prompt_tokens`` tokens of prompt.
    """

    line: int | None
    kind: str
    data: dict[str, Any]  # the example in internal form (messages with roles), as JSON
    sequence: RenderedSequence | None = None
    chosen: RenderedSequence | None = None
    rejected: RenderedSequence | None = None
    prompt_tokens: int = 0
    difference_truncated: bool = False

    @property
    def rendered(self) -> bool:
        return self.sequence is not None or self.chosen is not None


@dataclass(frozen=True)
class DatasetReport(Event):
    """The engine's verdict on a dataset: usable rows, every problem, token statistics, one rendered row."""

    type: ClassVar[str] = "dataset_report"
    file: str
    format: str
    kind: str  # "sft" | "preference" | "unpaired" | "text"
    rows: int  # usable rows
    rows_read: int = 0  # rows found, usable or not
    dropped: dict[str, int] = field(default_factory=dict)  # why rows were left out -> how many
    problems: tuple[Problem, ...] = ()
    example: ExamplePreview | None = None
    model: str = ""  # whose tokenizer measured ``tokens`` ('' without one)
    loss_on: str = ""
    tokens: TokenStats | None = None
    length_bias: LengthBias | None = None  # in tokens with a tokenizer, else in characters

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DatasetReport:
        """Build from a decoded JSON object (``v`` and ``type`` already checked); ProtocolError if malformed."""
        try:
            return _build(cls, data)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None

    @classmethod
    def from_json(cls, line: str | bytes) -> DatasetReport:
        report = parse_message(line)
        if not isinstance(report, cls):
            raise ProtocolError(f"expected a {cls.type} event, got {report.type!r}")
        return report


# Fields holding dataclasses, per class: (tuple, cls) for a list of them. Every other field must arrive as JSON
# of its own type (checked for the plain ones: str, int, float, bool, dict).
_NESTED: dict[type, dict[str, Any]] = {
    DatasetReport: {
        "problems": (tuple, Problem),
        "example": ExamplePreview,
        "tokens": TokenStats,
        "length_bias": LengthBias,
    },
    TokenStats: {"lengths": LengthStats, "trained": LengthStats, "length_bias": LengthBias},
    ExamplePreview: {"sequence": RenderedSequence, "chosen": RenderedSequence, "rejected": RenderedSequence},
    RenderedSequence: {"segments": (tuple, Segment)},
}
_SCALARS: dict[str, Any] = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}


_T = TypeVar("_T", bound="DataclassInstance")


def _build(cls: type[_T], data: Any) -> _T:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
    nested_fields = _NESTED.get(cls, {})
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue  # a missing required field fails in cls(**kwargs) below
        value = data[f.name]
        nested = nested_fields.get(f.name)
        if value is None:
            if "None" not in str(f.type):
                raise TypeError(f"{cls.__name__}.{f.name} may not be null")
        elif isinstance(nested, tuple):
            if not isinstance(value, list):
                raise TypeError(f"{cls.__name__}.{f.name} must be a list")
            value = tuple(_build(nested[1], v) for v in value)
        elif nested is not None:
            value = _build(nested, value)
        elif str(f.type).startswith("tuple[int"):
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise TypeError(f"{cls.__name__}.{f.name} must be a list of integers")
            value = tuple(value)
        else:
            _check_scalar(cls, f, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_scalar(cls: type, f: dataclasses.Field[Any], value: Any) -> None:
    base = str(f.type).split("[")[0].split(" | ")[0]
    want = _SCALARS.get(base)
    if want is None:
        return
    if isinstance(value, bool) and base in ("int", "float"):
        raise TypeError(f"{cls.__name__}.{f.name} must be a number, not a boolean")
    if not isinstance(value, want):
        raise TypeError(f"{cls.__name__}.{f.name} must be {base}, not {type(value).__name__}")


@dataclass(frozen=True)
class DatasetConverted(Event):
    """What ``engine data convert --json`` answers: a dataset written in another format."""

    type: ClassVar[str] = "dataset_converted"
    file: str
    out: str
    to: str  # the format written (trl, trl-conversational, llama-factory, messages)
    format: str  # the format read
    kind: str  # "sft" | "preference" | "unpaired" | "text"
    rows_written: int
    problems: tuple[Problem, ...] = ()
    # for LLaMA-Factory: the entry to add to its data/dataset_info.json (name -> description)
    dataset_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DatasetConverted:
        """Build from a decoded JSON object (``v`` and ``type`` already checked); ProtocolError if malformed."""
        try:
            return _build(cls, data)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"bad {cls.type} event: {exc}") from None


_NESTED[DatasetConverted] = {"problems": (tuple, Problem)}
EVENT_TYPES[DatasetReport.type] = DatasetReport
EVENT_TYPES[DatasetConverted.type] = DatasetConverted
