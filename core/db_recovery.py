"""A damaged database: say which file, keep it, start a fresh one with every row SQLite can still read.

Nothing here deletes: the damaged file (with its ``-wal`` and ``-shm`` companions, which may hold the newest
committed rows) is renamed to ``<name>.corrupt-<time>``, and the fresh database gets the readable rows of every
table of its schema (the list is read from the fresh database itself, parents before children, so a table added to
the schema is recovered too), read past damaged pages row by row (``sqlite3``'s ``.recover`` exists only in the
command-line shell). The result says per table what came back and what is only in the kept file.
Pure Python (sqlite3 only): the engine and the studio both use it.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_studio.core import preferences
from finetune_studio.core.store import DatabaseDamaged as DatabaseDamaged  # defined where it is raised
from finetune_studio.core.store import Store

COMPANIONS = ("-wal", "-shm")
ROWS_PER_READ = 500  # rows read per query while copying; a query that fails is narrowed down to the damaged rows


@dataclass(frozen=True)
class TableRecovery:
    """One table of a recovery: rows copied into the fresh database, rows that could not be read (counted by the
    row ids missing between the rows read), rows the fresh schema refused, and why when not all came back."""

    table: str
    copied: int = 0
    unreadable: int = 0
    refused: int = 0
    why: str = ""
    uncounted: bool = False  # the table's end could not be reached: more rows may be lost than counted

    @property
    def complete(self) -> bool:
        return not (self.unreadable or self.refused or self.why)

    def line(self) -> str:
        lost = []
        if self.unreadable:
            lost.append(f"{'at least ' if self.uncounted else ''}{self.unreadable} unreadable")
        if self.refused:
            lost.append(f"{self.refused} refused by the schema")
        if self.why and not lost:
            lost.append(self.why)
        return f"{self.table}: {self.copied} rows" + (f" ({'; '.join(lost)})" if lost else "")


@dataclass(frozen=True)
class Recovery:
    """What a recovery did: where the damaged file now lies, and per table what came back."""

    kept: Path
    tables: tuple[TableRecovery, ...] = ()
    # Tables of the damaged file this app's schema does not have (a newer app's): left in the kept file.
    not_copied: tuple[str, ...] = ()

    @property
    def copied(self) -> dict[str, int]:
        return {t.table: t.copied for t in self.tables}

    @property
    def unreadable(self) -> dict[str, str]:
        """table -> why, for each table some or all of whose rows did not come back."""
        return {t.table: t.line() for t in self.tables if not t.complete}

    @property
    def complete(self) -> bool:
        return all(t.complete for t in self.tables) and not self.not_copied

    def summary(self) -> str:
        """Per table what came back and, when anything did not, where it still lies."""
        lines = [f"The damaged file is kept as {self.kept}.", "Recovered, per table:"]
        lines += [f"  {t.line()}" for t in self.tables]
        if self.complete:
            lines.append("Every row was read and copied.")
            return "\n".join(lines)
        missing = [t.table for t in self.tables if not t.complete] + list(self.not_copied)
        lines.append(
            f"NOT everything came back: rows of {', '.join(missing)} are only in {self.kept}. Keep that file: "
            "sqlite3's .recover command (sqlite3 FILE .recover) may get more of them out."
        )
        if self.not_copied:
            lines.append(f"  tables this version does not know, left there: {', '.join(self.not_copied)}")
        return "\n".join(lines)


def damage(path: str | Path) -> str:
    """Why the database at ``path`` is unusable, or '' when it is fine (or does not exist yet)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return ""
    try:
        conn = sqlite3.connect(str(path), timeout=30)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return "" if result == "ok" else str(result)


def schema_tables(conn: sqlite3.Connection) -> list[str]:
    """The tables of a database, parents before the tables whose foreign keys name them (SQLite's own left out)."""
    names = [
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    ]
    parents = {n: {r[2] for r in conn.execute(f"PRAGMA foreign_key_list({_quote(n)})")} & set(names) for n in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and parents[n] <= set(ordered) | {n}]
        if not ready:  # a cycle: the rest in their order
            ready = [n for n in names if n not in ordered]
        ordered += ready
    return ordered


def recover(path: str | Path) -> Recovery:
    """Rename the damaged database aside, create a fresh one at ``path`` and copy into it every row that can be read,
    for every table of the fresh database's schema (and schema 1's preference pairs, moved into it)."""
    path = Path(path)
    kept = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while kept.exists():
        n += 1
        kept = kept.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    for suffix in COMPANIONS:  # first the companions: the main file's rename is what marks the move done
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{kept}{suffix}")
    os.replace(path, kept)
    fresh = Store(path)
    dst = fresh.db.conn
    try:
        tables = schema_tables(dst)
        try:
            src = sqlite3.connect(f"file:{kept}?mode=ro", uri=True, timeout=30)
            have = set(schema_tables(src))
        except sqlite3.DatabaseError as exc:  # not even the schema can be read
            return Recovery(kept, tuple(TableRecovery(t, why=f"nothing readable: {exc}") for t in tables))
        try:
            results = [
                copy_table(src, dst, t) if t in have else TableRecovery(t, why="not in the damaged file")
                for t in tables
            ]
            if "preference_pairs" in have and "preference_pairs" not in tables:  # schema 1's labels
                results.append(_copy_schema1_pairs(src, dst))
            not_copied = tuple(sorted(have - set(tables) - {"preference_pairs"}))
        finally:
            src.close()
    finally:
        fresh.close()
    return Recovery(kept, tuple(results), not_copied)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def copy_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> TableRecovery:
    """Copy ``table``'s readable rows, in row id order, in one transaction. A read that fails is narrowed down:
    rows are then read one at a time, and past a damaged page the copy goes on at the next row id that can be
    reached; the row ids skipped are the rows counted unreadable."""
    wanted = [r[1] for r in dst.execute(f"PRAGMA table_info({_quote(table)})")]
    try:
        have = [r[1] for r in src.execute(f"PRAGMA table_info({_quote(table)})")]
    except sqlite3.DatabaseError as exc:
        return TableRecovery(table, why=str(exc))
    columns = [c for c in have if c in wanted]
    if not columns:
        return TableRecovery(table, why="no column in common with this version's table")
    names = ", ".join(_quote(c) for c in columns)
    select = f"SELECT rowid, {names} FROM {_quote(table)} WHERE rowid > ? ORDER BY rowid LIMIT ?"
    insert = f"INSERT OR IGNORE INTO {_quote(table)} ({names}) VALUES ({', '.join('?' * len(columns))})"
    copied = unreadable = refused = 0
    why = ""
    uncounted = False
    last = -(2**63)  # the last row id read (or passed)
    dst.execute("BEGIN")
    try:
        while True:
            try:
                rows = src.execute(select, (last, ROWS_PER_READ)).fetchall()
            except sqlite3.DatabaseError as exc:
                why = why or str(exc)
                rows = _read_one_by_one(src, table, names, last)
            if not rows:  # the end, or the row after ``last`` cannot be read
                try:
                    nxt = _next_rowid(src, table, last)
                except sqlite3.DatabaseError as exc:  # not even its row id: damaged pages, skip past them
                    why = why or str(exc)
                    after = _next_reachable(src, table, last)
                    if after is None:  # nothing after them can be reached: the rest of the table is lost
                        unreadable += max(1, _max_rowid(src, table, last) - max(last, 0))
                        uncounted = True
                        break
                    unreadable += after - max(last, 0)  # row ids are given in order: those skipped were rows
                    last = after
                    continue
                if nxt is None:
                    break
                unreadable += 1  # its row id is there, its content is not (e.g. a damaged overflow page)
                last = nxt
                continue
            before = last
            for row in rows:
                if not isinstance(row[0], int) or row[0] <= last:
                    continue  # a damaged page can answer nonsense: only ever go forward
                try:
                    dst.execute(insert, row[1:])
                    copied += 1
                except sqlite3.DatabaseError:
                    refused += 1  # a row the fresh schema refuses (e.g. a damaged value)
                last = row[0]
            if last == before:  # nothing usable came back: count the next row id lost and go on past it
                unreadable += 1
                last = max(last, 0) + 1
    finally:
        dst.execute("COMMIT")
    if why:  # the table's row count, when an index still gives it, counts rows lost past the last reachable one
        try:
            total = int(src.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()[0])
        except sqlite3.DatabaseError:
            total = 0
        if total:
            unreadable, uncounted = max(unreadable, total - copied - refused), False
    return TableRecovery(table, copied, unreadable, refused, why if (unreadable or refused) else "", uncounted)


def _read_one_by_one(src: sqlite3.Connection, table: str, names: str, last: int) -> list[tuple[Any, ...]]:
    """The rows after ``last`` read one at a time, up to the first that cannot be read."""
    rows: list[tuple[Any, ...]] = []
    while len(rows) < ROWS_PER_READ:
        try:
            nxt = _next_rowid(src, table, last)
            if nxt is None:
                return rows
            row = src.execute(f"SELECT rowid, {names} FROM {_quote(table)} WHERE rowid = ?", (nxt,)).fetchone()
        except sqlite3.DatabaseError:
            return rows
        if row is None:
            return rows
        rows.append(row)
        last = nxt
    return rows


def _next_rowid(src: sqlite3.Connection, table: str, last: int) -> int | None:
    """The first row id after ``last``, read from the table's tree without the row's content (None: no more rows);
    raises sqlite3.DatabaseError when the pages on the way are damaged."""
    sql = f"SELECT rowid FROM {_quote(table)} WHERE rowid > ? ORDER BY rowid LIMIT 1"
    row = src.execute(sql, (last,)).fetchone()
    if row is None:
        return None
    if not isinstance(row[0], int) or row[0] <= last:  # a damaged page can answer nonsense
        raise sqlite3.DatabaseError(f"database disk image is malformed (row id {row[0]!r} after {last})")
    return row[0]


def _next_reachable(src: sqlite3.Connection, table: str, last: int) -> int | None:
    """Past damaged pages: the smallest row id after ``last`` from which a seek for the next row works (found by
    jumping ahead in growing steps, then narrowing back; the rows between it and that next row do not exist).
    None when no later row can be reached. Always more than ``last``, so a copy goes on."""

    def seeks(after: int) -> bool:
        try:
            _next_rowid(src, table, after)
        except sqlite3.DatabaseError:
            return False
        return True

    start = max(last, 0)
    top = _max_rowid(src, table, start)
    step = 1
    while start + step <= top and not seeks(start + step):
        step *= 2
    if start + step > top:
        return None
    lo, hi = start + step // 2 if step > 1 else start, start + step  # the seek after lo fails, after hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if seeks(mid) else (mid, hi)
    return hi


def _max_rowid(src: sqlite3.Connection, table: str, last: int) -> int:
    """The table's largest row id (its tree's rightmost path); ``last`` when that cannot be read either."""
    try:
        row = src.execute(f"SELECT max(rowid) FROM {_quote(table)}").fetchone()
    except sqlite3.DatabaseError:
        return last
    return last if row is None or row[0] is None else max(last, int(row[0]))


def _copy_schema1_pairs(src: sqlite3.Connection, dst: sqlite3.Connection) -> TableRecovery:
    """Schema 1's ``preference_pairs``: copied into a scratch table, then moved into prompts, candidates and
    comparisons as the migration to schema 2 moves them."""
    dst.execute(
        "CREATE TEMP TABLE preference_pairs (id INTEGER PRIMARY KEY, prompt TEXT, chosen TEXT, rejected TEXT, "
        "source TEXT, created_at FLOAT, updated_at FLOAT, note TEXT)"
    )
    try:
        result = copy_table(src, dst, "preference_pairs")
        with preferences.transaction(dst) as conn:
            rows = conn.execute("SELECT prompt, chosen, rejected, source, created_at FROM temp.preference_pairs")
            for prompt, chosen, rejected, source, created in rows.fetchall():
                preferences._add_pair(
                    conn, prompt, chosen, rejected, [], source=source or "schema-1", annotator="import", t=created
                )
    finally:
        dst.execute("DROP TABLE IF EXISTS temp.preference_pairs")
    return dataclasses.replace(result, table="preference_pairs (schema 1, moved into comparisons)")
