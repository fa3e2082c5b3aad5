"""``python -m finetune_studio.engine pairs``: the preference store from the command line.

    python -m finetune_studio.engine pairs import FILE [--mapping JSON] [--json]
    python -m finetune_studio.engine pairs export OUT_DIR --format trl|trl-conversational|llama-factory
                                                 [--snapshot ID] [--json] [--force]
    python -m finetune_studio.engine pairs stats [--json]

``import`` reads every preference layout the dataset readers know (TRL, TRL conversational, HH, UltraFeedback,
LLaMA-Factory ranking, chosen/rejected messages...) and adds the pairs; pairs already in the store are not added
again. ``export`` freezes the store's pairs as a snapshot (its id is printed, and ``dataset: pairs:<id>`` trains on
exactly those pairs) and writes them for TRL or LLaMA-Factory (with its ``dataset_info.json``) into a new or empty
folder or a previous pairs export (another folder only with ``--force``). Ties, both-bad and
skipped comparisons have no preferred side: they are left out, and the export says how many. Exit status: 0 on
success, 1 when the input cannot be used, 2 for a usage error.

``--json`` prints one event line on stdout: :class:`core.protocol.pairs_report.PairsImported`, ``PairsExported`` or
``PairsStats``, or a ``failed`` event (:class:`core.protocol.events.Failed`) when the input cannot be used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
from pathlib import Path

from finetune_studio.core import paths
from finetune_studio.core.preferences import PreferenceError
from finetune_studio.core.protocol.events import Failed, FailureKind
from finetune_studio.core.protocol.pairs_report import PairsExported, PairsImported, PairsStats
from finetune_studio.core.store import DatabaseDamaged, Store
from finetune_studio.engine.cli.argparsing import UsageErrorParser
from finetune_studio.engine.datasets.convert import llama_factory_info, write_examples
from finetune_studio.engine.datasets.loader import load_dataset
from finetune_studio.engine.datasets.pairs import example_to_pair, left_out_note, pair_to_example, resolve_snapshot
from finetune_studio.engine.datasets.problems import ProblemLog
from finetune_studio.engine.datasets.schema import DatasetError

EXPORT_FORMATS = ("trl", "trl-conversational", "llama-factory")
# What an export folder holds (a previous export, and only that, is replaced without --force).
EXPORT_FILES = frozenset({"pairs.json", "pairs.jsonl", "dataset_info.json", "snapshot.json"})


def _parser() -> argparse.ArgumentParser:
    parser = UsageErrorParser(prog="python -m finetune_studio.engine pairs", description="The preference store.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=UsageErrorParser)
    imp = sub.add_parser("import", help="add the pairs of a preference data file")
    imp.add_argument("file")
    imp.add_argument("--mapping", help="column/role mapping as JSON text")
    imp.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    imp.set_defaults(func=cmd_import)
    exp = sub.add_parser("export", help="snapshot the pairs and write them for TRL or LLaMA-Factory")
    exp.add_argument("out_dir")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    exp.add_argument("--snapshot", default="latest", help="an earlier snapshot's id (default: the store now)")
    exp.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    exp.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    exp.set_defaults(func=cmd_export)
    st = sub.add_parser("stats", help="prompts, candidates, decisions, pairs and snapshots in the store")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        store = Store()
    except DatabaseDamaged as exc:
        return _database_damaged(args, exc)
    try:
        return args.func(args, store)
    except (DatasetError, PreferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(Failed(message=str(exc), kind=FailureKind.DATA).to_json())
        return 1
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:  # locked, a constraint: not damage
            raise
        return _database_damaged(args, DatabaseDamaged(store.path, str(exc)))  # a page found damaged while reading
    finally:
        store.close()


def _database_damaged(args, exc: DatabaseDamaged) -> int:
    """The damaged database named, with what to do (``db recover``), as the message and as a failed event."""
    print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(Failed(message=f"Database problem: {exc}", kind=FailureKind.DATABASE).to_json())
    return 1


def cmd_import(args, store: Store) -> int:
    mapping = json.loads(args.mapping) if args.mapping else None
    data = load_dataset(args.file, mapping)
    if data.kind != "preference":
        raise DatasetError(
            f"{Path(args.file).name} holds {data.kind} data ({data.format} layout), not preference pairs: "
            "pairs import takes prompt/chosen/rejected data (TRL, HH, UltraFeedback, LLaMA-Factory ranking...)"
        )
    result = store.preferences.import_pairs((example_to_pair(ex) for ex in data.examples), source=Path(args.file).name)
    summary = PairsImported(
        file=args.file,
        format=data.format,
        pairs=len(data.examples),
        added=result.added,
        unchanged=result.unchanged,
        changed=result.changed,
        dropped=dict(data.dropped),
    )
    if args.json:
        print(summary.to_json())
        return 0
    print(
        f"imported {summary.pairs} pairs from {args.file} ({data.format}): {result.added} new, "
        f"{result.unchanged} already in the store, {result.changed} with a changed decision"
    )
    for reason, n in data.dropped.items():
        print(f"  {n} rows dropped: {reason}")
    return 0


def cmd_export(args, store: Store) -> int:
    out = Path(args.out_dir).expanduser()
    name = "pairs.json" if args.format == "llama-factory" else "pairs.jsonl"
    previous = _check_export_folder(out, name, args.force)  # before a snapshot is taken
    prefs = store.preferences
    snap = resolve_snapshot(prefs, args.snapshot)
    pairs = prefs.snapshot_pairs(snap.id)
    if not pairs:
        raise DatasetError("the preference store holds no pairs to export" + left_out_note(snap.left_out, "; "))
    out.mkdir(parents=True, exist_ok=True)
    log = ProblemLog()
    written = write_examples((pair_to_example(p, i + 1) for i, p in enumerate(pairs)), out / name, args.format, log)
    if args.format == "llama-factory":
        info = {snap.id: llama_factory_info("preference", name)}
        paths.atomic_write_text(out / "dataset_info.json", json.dumps(info, indent=2) + "\n")
    manifest = PairsExported(
        snapshot=snap.id,
        format=args.format,
        file=name,
        pairs=written,
        left_out=dict(snap.left_out),
        dropped=dict(log.dropped),
        created_at=snap.created_at,
    )
    # snapshot.json keeps the manifest's plain fields, as it always had them (no protocol version or type)
    paths.atomic_write_text(out / "snapshot.json", json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
    if previous:  # the earlier export's files this one did not write (another format's) would read as current
        kept = {name, "snapshot.json"} | ({"dataset_info.json"} if args.format == "llama-factory" else set())
        for stale in EXPORT_FILES - kept:
            (out / stale).unlink(missing_ok=True)
    if args.json:
        print(manifest.to_json())
        return 0
    print(f"exported {written} pairs as {args.format} to {out / name} (snapshot {snap.id})")
    note = left_out_note(snap.left_out)
    print(note or "left out of DPO data: none (no ties, both-bad or skips)")
    for reason, n in log.dropped.items():
        print(f"  {n} pairs not written: {reason}")
    print(f"train on exactly these pairs with  dataset: pairs:{snap.id}")
    return 0


def _check_export_folder(out: Path, name: str, force: bool) -> bool:
    """Whether ``out`` holds a previous pairs export (replaced as a whole). A folder holding other files is refused
    unless ``force`` (then only the export's own file names in it are replaced); a file is always refused."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder: give a new or empty folder for the export")
    if not out.is_dir():
        return False
    present = {p.name for p in out.iterdir()}
    if not present:
        return False
    if _is_pairs_export(out, present):
        return True
    if force:
        return False
    shown = ", ".join(sorted(present)[:5]) + (", ..." if len(present) > 5 else "")
    raise DatasetError(
        f"{out} already holds files that are not a pairs export ({shown}); choose a new or empty folder (or an "
        f"earlier pairs export, which is replaced), or add --force to write {name} and snapshot.json into it "
        "(files of those names are replaced, the others left as they are)"
    )


def _is_pairs_export(out: Path, present: set[str]) -> bool:
    """A folder this command wrote: only an export's files, with a snapshot.json that reads as its manifest."""
    if "snapshot.json" not in present or not present <= EXPORT_FILES:
        return False
    try:
        manifest = json.loads((out / "snapshot.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"snapshot", "format", "file"} <= manifest.keys()


def cmd_stats(args, store: Store) -> int:
    stats = PairsStats(**store.preferences.stats())
    if args.json:
        print(stats.to_json())
        return 0
    decisions = ", ".join(f"{n} {d}" for d, n in stats.decisions.items())
    print(f"prompts:     {stats.prompts}")
    print(f"candidates:  {stats.candidates}")
    print(f"comparisons: {stats.comparisons} ({decisions})")
    print(f"DPO pairs:   {stats.pairs} (ties, both-bad and skips are left out)")
    print(f"edits:       {stats.edits}; changed decisions: {stats.decision_changes}")
    print(f"annotators:  {stats.annotators}; snapshots: {stats.snapshots}")
    return 0
