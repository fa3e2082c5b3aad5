"""The ``json_fields`` reward: how many of a reference JSON object's fields an answer gets exactly right.

For structured extraction (the demo task: a person's name, age, city and job as one JSON object) a plain exact
match is all or nothing; this verifier gives the share of the reference's fields the answer has right, so an answer
with three of four fields right scores above one with none (``partial``), or 1 / 0 like an exact match
(``partial: false``).

Settings (defaults in brackets): ``column`` (the dataset column holding the reference object, as a mapping or as
JSON text); ``fields`` [all of the reference's keys] (the keys that are scored; others are not compared);
``exact_keys`` [true] (the answer must have exactly the reference's keys, no more and no fewer, else it scores 0);
``partial`` [true]; ``after_think`` [false].

The answer, surrounding white space aside, must be one JSON object (no code fence, no prose around it), else it
scores 0. A field is right when its value equals the reference's as a JSON value of the same type: a string is not a
number (``"31"`` is not ``31``), an integer is not a decimal (``31.0`` is not ``31``), ``true`` is not ``1``, null
is only null; objects compare key by key and arrays in order, the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finetune_studio.core.rewards.base import RewardError
from finetune_studio.core.rewards.spec import RewardSpec

# (answer text, row index, the dataset's columns) -> score, as ``core.rewards.verifiers.Scorer``
Scorer = Callable[[str, int, dict[str, Sequence[Any]]], float]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(text: str) -> dict[str, Any] | None:
    """``text`` as one JSON object, or None when it is anything else (NaN and Infinity are not JSON)."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def same_value(a: Any, b: Any) -> bool:
    """Equal as JSON values of the same type: strings, integers, decimals, booleans and null are told apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return bool(a == b)


def fields_score(
    answer: str,
    reference: Mapping[str, Any],
    *,
    fields: Sequence[str] | None = None,
    exact_keys: bool = True,
    partial: bool = True,
) -> float:
    """The share of ``fields`` (default: all of the reference's keys) that ``answer`` has right, in [0, 1];
    with ``partial`` off, 1 only when all are right. 0 when the answer is not one JSON object, or, with
    ``exact_keys``, when its keys are not exactly the reference's."""
    obj = _object(answer)
    if obj is None or (exact_keys and obj.keys() != reference.keys()):
        return 0.0
    keys = list(reference) if fields is None else list(fields)
    if not keys:
        return 1.0
    right = sum(1 for k in keys if k in obj and k in reference and same_value(obj[k], reference[k]))
    if partial:
        return right / len(keys)
    return 1.0 if right == len(keys) else 0.0


def _reference(spec: RewardSpec, value: Any, i: int) -> Mapping[str, Any]:
    if isinstance(value, str):
        parsed = _object(value)
        if parsed is None:
            raise RewardError(
                spec.name, f"row {i}: the reference {value[:80]!r} in column {spec.column!r} is not a JSON object"
            )
        return parsed
    if isinstance(value, Mapping):
        return value
    raise RewardError(
        spec.name,
        f"row {i}: the reference in column {spec.column!r} is {type(value).__name__}; give a JSON object "
        "(a mapping, or its JSON text)",
    )


def make(spec: RewardSpec) -> Scorer:
    """The scorer of (answer text, row index, columns) for a checked ``json_fields`` spec."""
    column = str(spec.column)
    fields = spec.params.get("fields")
    exact_keys = bool(spec.params.get("exact_keys", True))
    partial = bool(spec.params.get("partial", True))

    def score(text: str, i: int, columns: dict[str, Sequence[Any]]) -> float:
        reference = _reference(spec, columns[column][i], i)
        return fields_score(text, reference, fields=fields, exact_keys=exact_keys, partial=partial)

    return score
