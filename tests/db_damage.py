"""A database as a person's looks after some work, and damage as a failing disk does it: for recovery tests."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from finetune_studio.core import paths
from finetune_studio.core.store import Store


def labelled_store(prompts: int = 120) -> Path:
    """A database with rows in every table of the schema: two runs with metrics (named ones too), samples and
    rollouts, and the preference store after labelling (comparisons, a changed decision, an edit, a snapshot)."""
    store = Store()
    runs = [store.create_run({"model": "m", "dataset": f"d{i}"}, run_dir="") for i in range(2)]
    with store.db.conn:
        for step in range(1, 400):
            store.add_metrics(runs[0], "train", step, {"loss": 1.0 / step, "lr": 1e-4, "metrics": {"kl": 0.01}})
    store.add_samples(runs[0], 10, ["Say hi."], ["hi"])
    rollout = {"prompt": "Say hi.", "completion": "hi", "reward": 1.0, "rewards": {"json_valid": 1.0}, "advantage": 0.5}
    store.add_rollouts(runs[1], 1, [dict(rollout, group=g) for g in range(4)])
    prefs = store.preferences
    for i in range(prompts):
        pid = prefs.add_prompt(f"Question {i}: " + "why? " * 20, source="session")
        ids = [prefs.add_candidate(pid, f"answer {k} to {i}: " + "because " * 30, model="m", seed=k) for k in range(3)]
        prefs.rank(ids, annotator="alice", source="session")  # 3 comparisons per prompt
    first = prefs.pairs()[0]
    prefs.compare(first.chosen_id, first.rejected_id, "tie", annotator="alice")  # an audited change
    prefs.edit(first.rejected_id, "a better answer", annotator="alice")
    prefs.snapshot(note="export")
    store.close()
    return paths.db_path()


def leaf_pages(path: Path, table: str) -> list[int]:
    """The leaf pages that hold ``table``'s rows."""
    conn = sqlite3.connect(str(path))
    try:
        return [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,))]
    finally:
        conn.close()


def garble(path: Path, pages: list[int]) -> None:
    """Overwrite whole pages with garbage, as a failing disk or a torn copy does."""
    size = sqlite3.connect(str(path)).execute("PRAGMA page_size").fetchone()[0]
    noise = random.Random(7)
    with open(path, "r+b") as fh:
        for page in pages:
            fh.seek((page - 1) * size)
            fh.write(bytes(noise.randrange(256) for _ in range(size)))
