"""The preference store as training data: examples in, snapshots out, and ``dataset: pairs:...`` in a config.

``pairs:latest`` freezes the store's pairs now (a snapshot whose id is a hash of the pairs, so unchanged data gives
the same id); ``pairs:<snapshot id>`` names an earlier snapshot (an export's, or another run's). Ties, both-bad and
skipped comparisons have no preferred side and are never DPO pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_studio.core.preferences import Pair, PreferenceError, PreferenceStore, Snapshot
from finetune_studio.engine.datasets.problems import ProblemLog
from finetune_studio.engine.datasets.schema import DatasetError, LoadedDataset, Message, PreferencePair

PREFIX = "pairs:"


def is_store_dataset(dataset: str) -> bool:
    return dataset.startswith(PREFIX)


def _to_dicts(msgs) -> list[dict]:
    return [m.to_dict() for m in msgs]


def _to_messages(dicts: list[dict]) -> tuple[Message, ...]:
    return tuple(
        Message(role=d["role"], content=d.get("content") or "", tool_calls=tuple(d.get("tool_calls") or ()))
        for d in dicts
    )


def example_to_pair(example: PreferencePair) -> dict:
    """A dataset reader's pair as the store takes it."""
    return {
        "prompt": _to_dicts(example.prompt),
        "chosen": _to_dicts(example.chosen),
        "rejected": _to_dicts(example.rejected),
        "tools": list(example.tools),
    }


def pair_to_example(pair: Pair, line: int | None = None) -> PreferencePair:
    return PreferencePair(
        prompt=_to_messages(pair.prompt),
        chosen=_to_messages(pair.chosen),
        rejected=_to_messages(pair.rejected),
        tools=tuple(pair.tools),
        source_line=line,
    )


def resolve_snapshot(prefs: PreferenceStore, ref: str) -> Snapshot:
    """``pairs:latest`` (a snapshot of the store now) or ``pairs:<id>`` / ``<id>``."""
    name = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
    if name in ("", "latest"):
        return prefs.snapshot()
    return prefs.get_snapshot(name)


def load_snapshot(prefs: PreferenceStore, ref: str) -> tuple[LoadedDataset, Snapshot]:
    """The pairs of a snapshot as a dataset the trainer reads like a file."""
    try:
        snap = resolve_snapshot(prefs, ref)
    except PreferenceError as exc:
        raise DatasetError(str(exc)) from None
    examples = [pair_to_example(p, i + 1) for i, p in enumerate(prefs.snapshot_pairs(snap.id))]
    if not examples:
        raise DatasetError(
            f"the preference store holds no pairs for {ref!r}: import some (pairs import FILE) or label candidates "
            f"first{left_out_note(snap.left_out, prefix='; ')}"
        )
    return LoadedDataset(format="pairs", kind="preference", examples=examples, path=snap.id), snap


def left_out_note(left_out: dict, prefix: str = "") -> str:
    """'left out of DPO data: 2 ties, 1 both bad (no preferred side)', or '' when nothing was."""
    names = {"tie": ("tie", "ties"), "both_bad": ("both bad", "both bad"), "skip": ("skip", "skips")}
    parts = [f"{n} {names[d][n != 1]}" for d, n in sorted(left_out.items()) if n]
    return f"{prefix}left out of DPO data: {', '.join(parts)} (no preferred side)" if parts else ""


class StoreStream:
    """The pairs a ``pairs:`` spec names, read as ``data inspect`` reads a file (format 'pairs', kind 'preference').

    ``pairs:latest`` is the store's pairs as they are now, and nothing is written: the snapshot is frozen when a run
    starts (or an export is made). ``pairs:<snapshot id>`` is that snapshot's pairs. Raises DatasetError at once when
    the spec names no pairs, as training would."""

    format = "pairs"
    kind = "preference"

    def __init__(self, ref: str, prefs: PreferenceStore | None = None):
        self.path = ref
        self.log = ProblemLog()
        self.usable = 0
        self._store = None
        if prefs is None:
            from finetune_studio.core.store import Store

            self._store = Store()
            prefs = self._store.preferences
        name = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
        try:
            if name in ("", "latest"):
                pairs, left_out = prefs.pairs(), prefs.left_out()
            else:
                snap = prefs.get_snapshot(name)
                pairs, left_out = prefs.snapshot_pairs(snap.id), snap.left_out
        except PreferenceError as exc:
            self.close()
            raise DatasetError(str(exc)) from None
        self.close()
        if not pairs:
            raise DatasetError(
                f"the preference store holds no pairs for {ref!r}: import some (pairs import FILE) or label candidates "
                f"first{left_out_note(left_out, prefix='; ')}"
            )
        note = left_out_note(left_out)
        if note:
            self.log.add(note, level="note")
        self._pairs = pairs

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __iter__(self) -> Iterator[PreferencePair]:
        for i, pair in enumerate(self._pairs):
            self.usable += 1
            yield pair_to_example(pair, i + 1)

    def result(self, examples: list) -> LoadedDataset:
        if not examples:
            raise DatasetError(f"the preference store holds no pairs for {self.path!r}")
        return LoadedDataset(format=self.format, kind=self.kind, examples=examples, path=self.path)
