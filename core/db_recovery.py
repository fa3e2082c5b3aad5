"""A damaged database: say which file, keep it, start a fresh one with every row SQLite can still read.

Nothing here deletes: the damaged file (with its ``-wal`` and ``-shm`` companions, which may hold the newest
committed rows) is renamed to ``<name>.corrupt-<time>``, and the fresh database gets the rows of each table that
can still be read, copied one by one (``sqlite3``'s ``.recover`` exists only in the command-line shell).
Pure Python (sqlite3 only): the engine and the studio both use it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune_studio.core.store import DatabaseDamaged as DatabaseDamaged  # defined where it is raised
from finetune_studio.core.store import Store

TABLES = ("runs", "metrics", "preference_pairs")
COMPANIONS = ("-wal", "-shm")


@dataclass(frozen=True)
class Recovery:
    """What a recovery did: where the damaged file now lies, and the rows copied (or not) per table."""

    kept: Path
    copied: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # table -> why (some or all of its rows lost)

    def summary(self) -> str:
        rows = ", ".join(f"{n} {t}" for t, n in self.copied.items()) or "no rows"
        lost = f"; could not read all of: {', '.join(self.unreadable)}" if self.unreadable else ""
        return f"kept the damaged file as {self.kept}; recovered {rows}{lost}"


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


def recover(path: str | Path) -> Recovery:
    """Rename the damaged database aside, create a fresh one at ``path`` and copy what can be read."""
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
    copied, unreadable = {}, {}
    try:
        src = sqlite3.connect(str(kept), timeout=30)
    except sqlite3.DatabaseError as exc:
        fresh.close()
        return Recovery(kept, {}, {t: str(exc) for t in TABLES})
    try:
        for table in TABLES:
            copied[table], why = _copy_table(src, fresh.db.conn, table)
            if why:
                unreadable[table] = why
    finally:
        src.close()
        fresh.close()
    return Recovery(kept, copied, unreadable)


def _copy_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> tuple[int, str]:
    """Rows of ``table`` copied one by one until the first unreadable page; (rows copied, why it stopped)."""
    wanted = [r[1] for r in dst.execute(f"PRAGMA table_info({table})")]
    try:
        have = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
        columns = [c for c in have if c in wanted]
        if not columns:
            return 0, "table missing"
        cursor = src.execute(f"SELECT {', '.join(columns)} FROM {table}")
    except sqlite3.DatabaseError as exc:
        return 0, str(exc)
    insert = f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    count = 0
    dst.execute("BEGIN")
    try:
        while True:
            try:
                row = cursor.fetchone()
            except sqlite3.DatabaseError as exc:
                return count, str(exc)
            if row is None:
                return count, ""
            try:
                dst.execute(insert, row)
                count += 1
            except sqlite3.DatabaseError:
                continue  # a row the fresh schema refuses (e.g. a damaged value): leave it out
    finally:
        dst.execute("COMMIT")
