"""The preference store: schema 1 -> 2 migration, decisions and their audit trail, rankings, edits, de-duplication,
and a kill -9 in the middle of a burst of writes."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
import sys

import pytest

from finetune_studio.core.preferences import Decision, PreferenceError
from finetune_studio.core.store import SCHEMA_VERSION, Store

# Schema 1 exactly as the studio wrote it before the preference store (tables created by sqlite-utils).
SCHEMA_1 = """
CREATE TABLE "runs" ("id" TEXT PRIMARY KEY, "name" TEXT, "status" TEXT NOT NULL DEFAULT 'created', "model" TEXT,
  "dataset" TEXT, "method" TEXT, "objective" TEXT, "config" TEXT NOT NULL, "run_dir" TEXT, "pid" INTEGER,
  "device" TEXT, "created_at" REAL, "started_at" REAL, "updated_at" REAL, "finished_at" REAL,
  "step" INTEGER DEFAULT 0, "total_steps" INTEGER, "final_loss" REAL, "eval_loss" REAL, "error" TEXT,
  "error_kind" TEXT, "adapter_dir" TEXT, "memory_budget_bytes" INTEGER, "memory_peak_bytes" INTEGER,
  "parent_run_id" TEXT);
CREATE TABLE "metrics" ("run_id" TEXT REFERENCES "runs"("id"), "kind" TEXT, "step" INTEGER, "loss" REAL, "lr" REAL,
  "grad_norm" REAL, "tokens_per_s" REAL, "memory_used_bytes" INTEGER, "memory_peak_bytes" INTEGER, "epoch" REAL,
  "elapsed_s" REAL, "reward_chosen" REAL, "reward_rejected" REAL, "reward_margin" REAL, "reward_accuracy" REAL,
  "eval_loss" REAL, "time" REAL, PRIMARY KEY ("run_id", "kind", "step"));
CREATE TABLE "preference_pairs" ("id" INTEGER PRIMARY KEY, "prompt" TEXT, "chosen" TEXT, "rejected" TEXT,
  "source" TEXT, "created_at" REAL, "updated_at" REAL, "note" TEXT);
PRAGMA user_version = 1;
"""


def _schema_1_db(path):
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1)
    conn.execute(
        "INSERT INTO runs (id, name, status, config, step, final_loss) "
        "VALUES ('r1', 'old run', 'completed', '{}', 8, 0.5)"
    )
    conn.execute("INSERT INTO metrics (run_id, kind, step, loss) VALUES ('r1', 'train', 1, 2.5)")
    rows = [("2+2?", "4", "5", "labels"), ("Capital of France?", "Paris", "Lyon", "labels"), ("2+2?", "4", "5", "x")]
    conn.executemany(
        "INSERT INTO preference_pairs (prompt, chosen, rejected, source, created_at, updated_at, note) "
        "VALUES (?, ?, ?, ?, 1.0, 1.0, '')",
        rows,
    )
    conn.commit()
    conn.close()


def test_schema_1_database_migrates_keeping_runs_metrics_and_pairs(tmp_path):
    path = tmp_path / "studio.db"
    _schema_1_db(path)
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    run = store.get_run("r1")
    assert run["name"] == "old run" and run["final_loss"] == 0.5 and run["best_step"] is None
    assert store.metrics("r1")[0]["loss"] == 2.5
    pairs = store.pairs()
    # The exact duplicate row of schema 1 is one pair now.
    assert [(p.prompt[0]["content"], p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        ("2+2?", "4", "5"),
        ("Capital of France?", "Paris", "Lyon"),
    ]
    assert pairs[0].prompt == [{"role": "user", "content": "2+2?"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "4"}]
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "preference_pairs" not in tables and {"prompts", "candidates", "comparisons", "edits"} <= tables
    store.update_run("r1", best_step=4, best_eval_loss=0.25)
    store.close()
    again = Store(path)  # opening a migrated database changes nothing
    assert len(again.pairs()) == 2 and again.get_run("r1")["best_step"] == 4
    assert again.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _prompt_with(store, *answers):
    prefs = store.preferences
    pid = prefs.add_prompt("Name a colour.")
    ids = [prefs.add_candidate(pid, a, model="m", seed=i, sampling={"temperature": 0.7}) for i, a in enumerate(answers)]
    return pid, ids


def test_decisions_give_pairs_only_with_a_preferred_side_and_changes_are_audited(tmp_path):
    store = Store(tmp_path / "s.db")
    prefs = store.preferences
    pid, (red, blue, green, rock) = _prompt_with(store, "Red.", "Blue.", "Green.", "A rock.")
    assert prefs.candidate(red)["seed"] == 0 and json.loads(prefs.candidate(red)["sampling"]) == {"temperature": 0.7}
    c1 = prefs.compare(red, rock, "a", strength=0.9, shown_left=rock, annotator="ann")
    prefs.compare(blue, green, Decision.TIE, annotator="ann")
    prefs.compare(rock, green, Decision.BOTH_BAD, annotator="ann")
    prefs.compare(red, blue, Decision.SKIP, annotator="ann")
    texts = [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in prefs.pairs()]
    assert texts == [("Red.", "A rock.")]
    assert prefs.left_out() == {"tie": 1, "both_bad": 1, "skip": 1}
    row = prefs.comparison(c1)
    assert row["strength"] == 0.9 and row["shown_left"] == rock and row["annotator"] == "ann"

    # The same two candidates, given the other way round, are the same comparison: the decision changes.
    assert prefs.compare(rock, red, "a", annotator="ann") == c1
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in prefs.pairs()] == [("A rock.", "Red.")]
    change = prefs.history(c1)
    assert len(change) == 1 and change[0]["old_strength"] == 0.9 and change[0]["new_strength"] is None
    assert {change[0]["old_decision"], change[0]["new_decision"]} == {"a", "b"}
    assert prefs.compare(rock, red, "a", annotator="ann") == c1 and len(prefs.history(c1)) == 1  # unchanged
    with pytest.raises(ValueError, match="unknown decision"):
        prefs.compare(red, blue, "maybe")
    with pytest.raises(PreferenceError, match="unknown candidate"):
        prefs.compare(red, "nope", "a")
    other = prefs.add_candidate(prefs.add_prompt("Another prompt"), "Red.")
    with pytest.raises(PreferenceError, match="different prompts"):
        prefs.compare(red, other, "a")
    assert prefs.add_candidate(pid, "Red.") == red  # the same answer is one candidate


def test_ranking_k_candidates_gives_every_pair_and_an_edit_beats_its_original(tmp_path):
    store = Store(tmp_path / "s.db")
    prefs = store.preferences
    _, ids = _prompt_with(store, "one", "two", "three", "four")
    prefs.rank(ids, annotator="ann")
    got = {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in prefs.pairs()}
    assert got == set(itertools.combinations(["one", "two", "three", "four"], 2))  # C(4, 2) = 6, better first
    edited = prefs.edit(ids[3], "four, fixed", annotator="ann")
    last = prefs.pairs()[-1]
    assert last.chosen_id == edited and last.rejected_id == ids[3] and last.chosen[0]["content"] == "four, fixed"
    assert prefs.stats()["edits"] == 1 and prefs.stats()["pairs"] == 7


def test_importing_the_same_pairs_twice_adds_none_and_snapshots_are_content_addressed(tmp_path):
    store = Store(tmp_path / "s.db")
    prefs = store.preferences
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    first = prefs.import_pairs(pairs, source="a.jsonl")
    assert (first.added, first.unchanged, first.changed) == (5, 0, 0)
    snap = prefs.snapshot()
    again = prefs.import_pairs(pairs, source="copy.jsonl")
    assert (again.added, again.unchanged) == (0, 5)
    assert prefs.stats()["comparisons"] == 5 and prefs.stats()["candidates"] == 10
    assert prefs.snapshot().id == snap.id and len(prefs.snapshots()) == 1
    flipped = prefs.import_pairs([{"prompt": "q0", "chosen": "bad 0", "rejected": "good 0"}])
    assert flipped.changed == 1 and prefs.stats()["decision_changes"] == 1
    assert prefs.snapshot().id != snap.id
    frozen = prefs.snapshot_pairs(snap.id)  # a snapshot keeps the pairs as they were
    assert [p.chosen[0]["content"] for p in frozen] == [f"good {i}" for i in range(5)]
    with pytest.raises(PreferenceError, match="no pairs snapshot"):
        prefs.get_snapshot("pairs-nothing")


BURST = """
import sys
from finetune_studio.core.store import Store
store = Store(sys.argv[1])
prefs = store.preferences
pid = prefs.add_prompt("burst prompt")
previous = None
for i in range(100000):
    cid = prefs.add_candidate(pid, f"answer {i}", seed=i)
    if previous is not None:
        prefs.compare(cid, previous, "a", annotator="burst")
    print(cid, flush=True)  # committed: the call returned
    previous = cid
"""


def test_kill_9_during_a_burst_of_inserts_keeps_every_committed_row(tmp_path):
    path = tmp_path / "burst.db"
    Store(path).close()
    child = subprocess.Popen(
        [sys.executable, "-P", "-c", BURST, str(path)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    committed = []
    try:
        for line in child.stdout:
            committed.append(line.strip())
            if len(committed) == 300:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    store = Store(path)
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in store.db.execute("SELECT id FROM candidates")}
    assert set(committed) <= stored
    # Each candidate after the first was compared with its predecessor in its own commit: those that were
    # printed have their comparison, and nothing is half-written.
    comparisons = store.db.execute("SELECT count(*) FROM comparisons").fetchone()[0]
    assert comparisons >= len(committed) - 1
    assert comparisons in (len(stored) - 1, len(stored) - 2)
    store.preferences.add_candidate(store.preferences.add_prompt("after the crash"), "still writable")
