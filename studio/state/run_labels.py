"""How a run is named where a person picks one (adapter lists, Init adapter, headings, dialog titles): by its name,
with "from <parent name>" when it started from another run's adapter, and its id in a tooltip. Ids such as
``20261207-013549-58921c`` do not tell an SFT run from the DPO run trained on top of it; names do.

Runs are the store's rows (dicts) or records with the same fields.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any


def field(run: Any, key: str, default: Any = None) -> Any:
    """A field of a store row (dict) or record (attribute)."""
    if isinstance(run, Mapping):
        return run.get(key, default)
    return getattr(run, key, default)


def run_name(run: Any) -> str:
    return str(field(run, "name") or field(run, "id") or "")


def run_label(run: Any, parent: Any = None) -> str:
    """``name``, or ``name from parent-name`` when the run started from ``parent`` (its ``parent_run_id``)."""
    name = run_name(run)
    if parent is not None:
        return f"{name} from {run_name(parent)}"
    parent_id = field(run, "parent_run_id")
    return f"{name} from {parent_id}" if parent_id else name


def run_tooltip(run: Any) -> str:
    """The run's id, and what it trained (objective, method) and when, for the tooltip beside its label."""
    bits = [str(field(run, "id") or "")]
    how = " ".join(str(field(run, k) or "").upper() for k in ("objective", "method") if field(run, k))
    if how:
        bits.append(how)
    created = field(run, "created_at")
    if created:
        bits.append(time.strftime("%Y-%m-%d %H:%M", time.localtime(created)))
    return " · ".join(b for b in bits if b)


def run_labels(runs: Iterable[Any], everyone: Iterable[Any] | None = None) -> dict[str, str]:
    """Run id -> label for ``runs``, parents looked up in ``everyone`` (default: ``runs``). Two runs with one label
    get their start time added, so no two entries read the same."""
    runs = list(runs)
    by_id = {field(r, "id"): r for r in (list(everyone) if everyone is not None else runs)}
    labels = {field(r, "id"): run_label(r, by_id.get(field(r, "parent_run_id"))) for r in runs}
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    for r in runs:
        rid = field(r, "id")
        if seen[labels[rid]] > 1:
            created = field(r, "created_at")
            when = time.strftime("%m-%d %H:%M:%S", time.localtime(created)) if created else rid
            labels[rid] = f"{labels[rid]} ({when})"
    return labels
