"""Recovering a damaged database keeps every table of the schema (issue 22): runs, metrics, samples and every label
(prompts, candidates, comparisons, decision changes, edits, snapshots), and says per table what came back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from db_damage import garble, labelled_store, leaf_pages

from finetune_studio.core import db_recovery, paths
from finetune_studio.core.store import Store


def counts(path: Path, tables: list[str]) -> dict[str, int]:
    conn = sqlite3.connect(str(path))
    try:
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        conn.close()


def rows(path: Path, table: str) -> list[tuple]:
    conn = sqlite3.connect(str(path))
    try:
        return sorted(conn.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)
    finally:
        conn.close()


def test_every_table_of_the_schema_is_recovered_row_for_row():
    db = labelled_store(40)
    fresh_schema = db_recovery.schema_tables(Store(db.parent / "empty.sqlite3").db.conn)
    before = counts(db, fresh_schema)
    # Every table of the schema holds rows here: a table added to the schema without a row here fails this test,
    # and one recovery leaves out fails the next lines.
    assert all(before.values()), [t for t, n in before.items() if not n]
    result = db_recovery.recover(db)
    assert [t.table for t in result.tables] == fresh_schema  # parents before children
    assert {"prompts", "candidates", "comparisons", "decision_changes", "edits", "snapshots"} <= set(fresh_schema)
    assert result.copied == before and result.complete and not result.unreadable
    for table in fresh_schema:
        assert rows(db, table) == rows(result.kept, table), table
    assert "Every row was read and copied" in result.summary() and str(result.kept) in result.summary()
    store = Store()
    assert store.preferences.stats()["comparisons"] == before["comparisons"]


def test_schema_order_puts_parents_first():
    order = db_recovery.schema_tables(Store().db.conn)
    assert order.index("prompts") < order.index("candidates") < order.index("comparisons")
    assert order.index("comparisons") < order.index("decision_changes") and order.index("runs") < order.index("metrics")
    assert order.index("snapshots") < order.index("snapshot_pairs")


def test_rows_past_pages_overwritten_with_garbage_are_copied_and_the_lost_ones_counted():
    db = labelled_store()
    tables = db_recovery.schema_tables(Store(db.parent / "empty.sqlite3").db.conn)
    before = counts(db, tables)
    hit = {t: leaf_pages(db, t) for t in ("comparisons", "candidates", "metrics")}
    assert all(len(p) >= 3 for p in hit.values()), hit
    garble(db, [p[len(p) // 2] for p in hit.values()])  # a page in the middle of each
    assert db_recovery.damage(db)
    result = db_recovery.recover(db)
    got = {t.table: t for t in result.tables}
    print("\n".join(t.line() + f" of {before[t.table]}" for t in result.tables))
    for table in hit:  # the rows before and after the damaged page came back; the lost ones are counted
        t = got[table]
        assert 0 < t.copied < before[table] and t.unreadable > 0 and t.copied + t.unreadable == before[table], t
    for table in set(tables) - set(hit):
        assert got[table].copied == before[table] and got[table].complete, got[table]
    summary = result.summary()
    assert str(result.kept) in summary and "NOT everything came back" in summary and "comparisons" in summary
    assert not result.complete and set(result.unreadable) == set(hit)
    store = Store()
    assert store.preferences.stats()["comparisons"] == got["comparisons"].copied
    assert db_recovery.damage(db) == ""


def test_a_schema_1_database_keeps_its_preference_pairs(tmp_path):
    db = paths.db_path()
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db))
    conn.executescript(
        "CREATE TABLE runs (id TEXT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'created', config TEXT NOT NULL);"
        "CREATE TABLE preference_pairs (id INTEGER PRIMARY KEY, prompt TEXT, chosen TEXT, rejected TEXT, "
        "source TEXT, created_at FLOAT, updated_at FLOAT, note TEXT);"
        "PRAGMA user_version = 1;"
    )
    conn.executemany(
        "INSERT INTO preference_pairs (prompt, chosen, rejected, source, created_at) VALUES (?, ?, ?, ?, 1.0)",
        [(f"q{i}", f"good {i}", f"bad {i}", "old.jsonl") for i in range(7)],
    )
    conn.commit()
    conn.close()
    result = db_recovery.recover(db)
    assert any(t.table.startswith("preference_pairs") and t.copied == 7 for t in result.tables), result.summary()
    pairs = Store().preferences.pairs()
    assert sorted(p.chosen[0]["content"] for p in pairs) == sorted(f"good {i}" for i in range(7))
