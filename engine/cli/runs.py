"""``python -m finetune_studio.engine runs``: the runs in the store, and where a run started from.

    python -m finetune_studio.engine runs lineage RUN [--json]

``lineage`` lists the run and the runs it started from (``init_adapter``), oldest first, then the runs started
from it. RUN is a run id, a unique id prefix or a run folder. ``--json`` prints one
:class:`core.protocol.run_lineage.RunLineage` event on stdout, or a ``failed`` event when there is no such run.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from finetune_studio.core.protocol.events import Failed, FailureKind
from finetune_studio.core.protocol.run_lineage import LineageRun, RunLineage
from finetune_studio.core.store import DatabaseDamaged, RunRecord, Store


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_studio.engine runs", description="Runs in the store.")
    sub = parser.add_subparsers(dest="command", required=True)
    lin = sub.add_parser("lineage", help="the runs a run started from, and the runs started from it")
    lin.add_argument("run")
    lin.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        store = Store()
    except DatabaseDamaged as exc:
        return _database_damaged(args, exc)
    try:
        run = store.find_run(args.run)
        if run is None:
            message = f"no run named {args.run!r}; give a run id, a unique prefix or a run folder"
            print(f"error: {message}", file=sys.stderr)
            if args.json:
                print(Failed(message=message, kind=FailureKind.CONFIG).to_json())
            return 1
        chain = store.lineage(run.id)
        children = store.children(run.id)
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:  # locked, a constraint: not damage
            raise
        return _database_damaged(args, DatabaseDamaged(store.path, str(exc)))  # a page found damaged while reading
    finally:
        store.close()
    answer = RunLineage(
        lineage=tuple(_lineage_run(r) for r in chain),
        children=tuple(_lineage_run(r) for r in children),
    )
    if args.json:
        print(answer.to_json())
        return 0
    for depth, r in enumerate(answer.lineage):
        extra = f", data {r.pairs_snapshot}" if r.pairs_snapshot else ""
        print(f"{'  ' * depth}{r.id}  {r.objective} {r.status}, step {r.step}{extra}  {r.name}")
    for r in answer.children:
        print(f"{'  ' * len(chain)}started from it: {r.id}  {r.objective} {r.status}  {r.name}")
    return 0


def _database_damaged(args: argparse.Namespace, exc: DatabaseDamaged) -> int:
    """The damaged database named, with what to do (``db recover``), as the message and as a failed event."""
    print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(Failed(message=f"Database problem: {exc}", kind=FailureKind.DATABASE).to_json())
    return 1


def _lineage_run(r: RunRecord) -> LineageRun:
    return LineageRun(
        id=r.id,
        name=r.name,
        objective=r.objective,
        status=r.status.value,
        step=r.step,
        final_loss=r.final_loss,
        init_adapter=r.init_adapter,
        pairs_snapshot=r.pairs_snapshot,
        parent_run_id=r.parent_run_id,
    )
