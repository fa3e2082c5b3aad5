"""``python -m finetune_studio.engine runs``: the runs in the store, and where a run started from.

    python -m finetune_studio.engine runs lineage RUN [--json]

``lineage`` lists the run and the runs it started from (``init_adapter``), oldest first, then the runs started
from it. RUN is a run id, a unique id prefix or a run folder.
"""

from __future__ import annotations

import argparse
import json
import sys

from finetune_studio.core.store import Store

FIELDS = ("id", "name", "objective", "status", "step", "final_loss", "init_adapter", "pairs_snapshot", "parent_run_id")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_studio.engine runs", description="Runs in the store.")
    sub = parser.add_subparsers(dest="command", required=True)
    lin = sub.add_parser("lineage", help="the runs a run started from, and the runs started from it")
    lin.add_argument("run")
    lin.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    store = Store()
    try:
        run = store.find_run(args.run)
        if run is None:
            print(f"error: no run named {args.run!r}; give a run id, a unique prefix or a run folder", file=sys.stderr)
            return 1
        chain = store.lineage(run["id"])
        children = store.children(run["id"])
    finally:
        store.close()
    if args.json:
        out = {"lineage": [{k: r.get(k) for k in FIELDS} for r in chain]}
        out["children"] = [{k: r.get(k) for k in FIELDS} for r in children]
        print(json.dumps(out))
        return 0
    for depth, r in enumerate(chain):
        extra = f", data {r['pairs_snapshot']}" if r.get("pairs_snapshot") else ""
        print(f"{'  ' * depth}{r['id']}  {r['objective'] or ''} {r['status']}, step {r['step']}{extra}  {r['name']}")
    for r in children:
        print(f"{'  ' * len(chain)}started from it: {r['id']}  {r['objective'] or ''} {r['status']}  {r['name']}")
    return 0
