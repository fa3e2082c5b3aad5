"""The preference store: prompts, candidate answers, a person's comparisons, edits, and the DPO pairs they give.

Tables (schema version 2 of the studio database, created by :func:`migrate_v2`):

* ``prompts``: a conversation up to the answer (JSON messages, tools); the id is a hash of its content.
* ``candidates``: one answer to a prompt (its turns as JSON, the plain text, and where it came from: model,
  adapter, run and checkpoint, seed, sampling settings, token count, time); the id hashes prompt and answer.
* ``comparisons``: candidate A against candidate B, a :class:`Decision`, an optional strength, which candidate was
  shown on the left, the annotator and the time. One comparison per (pair of candidates, annotator): recording it
  again changes the decision, and ``decision_changes`` keeps the audit trail of every change.
* ``edits``: a person rewrote an answer; the edited answer becomes a candidate preferred to the original.
* ``snapshots`` / ``snapshot_pairs``: a frozen list of (prompt, chosen, rejected) that one export or one DPO run
  used; the id is a hash of the list, so the same pairs give the same snapshot.

Pairs are derived from comparisons: A or B gives (chosen, rejected); a tie, both-bad or skip gives none. Ranking K
candidates records C(K, 2) comparisons. Content hashes make every write idempotent: importing the same pairs twice
adds nothing, and a pair is the same pair whoever labelled it (importing the store's own export adds nothing). Each
call commits in one transaction (an import: short chunks, then one for all its comparisons; the database is in WAL
mode), so a kill -9 at any moment keeps every call that returned and corrupts nothing.

Pure Python: the engine turns the message lists into its own examples.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

HASH_CHARS = 16
IMPORT_CHUNK = 500  # pairs whose prompts and candidates one of an import's short transactions writes


class Decision(enum.StrEnum):
    """What a person decided about candidate A against candidate B."""

    A = "a"
    B = "b"
    TIE = "tie"
    BOTH_BAD = "both_bad"
    SKIP = "skip"

    @property
    def gives_pair(self) -> bool:
        """Only a preferred side makes a DPO pair; ties, both-bad and skips are left out of DPO data."""
        return self in (Decision.A, Decision.B)

    @classmethod
    def parse(cls, value: str | Decision) -> Decision:
        try:
            return cls(value.value if isinstance(value, Decision) else str(value).lower())
        except ValueError:
            raise ValueError(f"unknown decision {value!r}: choose one of {', '.join(d.value for d in cls)}") from None


class PreferenceError(ValueError):
    """A request the store cannot carry out (unknown prompt, candidate or snapshot); the message says which."""


def _hash(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def _messages(value: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts; a string is one user (prompt) turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [dict(m) for m in value]


def _answer_turns(value: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return [dict(m) for m in value]


def _plain_text(turns: list[dict[str, Any]]) -> str:
    return "\n".join(str(t.get("content", "")) for t in turns if t.get("role") == "assistant")


@dataclass(frozen=True)
class Pair:
    """One DPO pair derived from a comparison: message lists ready for the engine."""

    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    tools: list[Any] = field(default_factory=list)
    prompt_id: str = ""
    chosen_id: str = ""
    rejected_id: str = ""


@dataclass(frozen=True)
class ImportResult:
    added: int  # comparisons new to the store
    unchanged: int  # already there with the same decision
    changed: int  # already there with another decision (now replaced, audited)


@dataclass(frozen=True)
class Snapshot:
    id: str
    created_at: float
    pairs: int
    left_out: dict[str, int]  # decision value -> comparisons not in DPO data


# --- schema -------------------------------------------------------------------------------------------------------
_DECISIONS_SQL = ", ".join(f"'{d.value}'" for d in Decision)
SCHEMA_V2 = f"""
CREATE TABLE IF NOT EXISTS prompts (
    id TEXT PRIMARY KEY,
    messages TEXT NOT NULL,
    tools TEXT NOT NULL DEFAULT '[]',
    source TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    turns TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    adapter TEXT NOT NULL DEFAULT '',
    run_id TEXT NOT NULL DEFAULT '',
    checkpoint TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    sampling TEXT NOT NULL DEFAULT '{{}}',
    token_count INTEGER,
    source TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS candidates_prompt ON candidates(prompt_id);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    candidate_a TEXT NOT NULL REFERENCES candidates(id),
    candidate_b TEXT NOT NULL REFERENCES candidates(id),
    decision TEXT NOT NULL CHECK (decision IN ({_DECISIONS_SQL})),
    strength REAL,
    shown_left TEXT NOT NULL DEFAULT '',
    annotator TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decision_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    old_decision TEXT NOT NULL,
    new_decision TEXT NOT NULL,
    old_strength REAL,
    new_strength REAL,
    annotator TEXT NOT NULL DEFAULT '',
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    original_id TEXT NOT NULL REFERENCES candidates(id),
    edited_id TEXT NOT NULL REFERENCES candidates(id),
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    annotator TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    pairs INTEGER NOT NULL,
    left_out TEXT NOT NULL DEFAULT '{{}}',
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS snapshot_pairs (
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
    position INTEGER NOT NULL,
    prompt_id TEXT NOT NULL,
    chosen_id TEXT NOT NULL,
    rejected_id TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, position)
);
CREATE TABLE IF NOT EXISTS samples (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    position INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (run_id, step, position)
);
"""
# Run columns that schema 2 adds (lineage, the data snapshot, early stopping's best checkpoint).
RUN_COLUMNS_V2 = {
    "init_adapter": "TEXT",
    "pairs_snapshot": "TEXT",
    "best_step": "INTEGER",
    "best_eval_loss": "REAL",
    "best_checkpoint": "TEXT",
}


def migrate_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2, in the caller's transaction: the preference tables, new run columns, and the rows of
    schema 1's ``preference_pairs`` moved into prompts, candidates and comparisons."""
    for statement in SCHEMA_V2.split(";"):
        if statement.strip():
            conn.execute(statement)
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    for name, sql_type in RUN_COLUMNS_V2.items():
        if name not in have:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")
    old = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'preference_pairs'").fetchone()
    if old:
        rows = conn.execute("SELECT prompt, chosen, rejected, source, created_at FROM preference_pairs ORDER BY id")
        for prompt, chosen, rejected, source, created in rows.fetchall():
            _add_pair(conn, prompt, chosen, rejected, [], source=source or "schema-1", annotator="import", t=created)
        conn.execute("DROP TABLE preference_pairs")


# --- writing ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic write (the connection is in autocommit mode; nested calls join the outer transaction)."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_INSERT_PROMPT = "INSERT OR IGNORE INTO prompts (id, messages, tools, source, created_at) VALUES (?, ?, ?, ?, ?)"
_INSERT_CANDIDATE = (
    "INSERT OR IGNORE INTO candidates (id, prompt_id, text, turns, model, adapter, run_id, checkpoint, seed, "
    "sampling, token_count, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _prompt_row(pid: str, messages: list[dict[str, Any]], tools: list[Any], source: str, t: float) -> tuple[Any, ...]:
    return (pid, json.dumps(messages, ensure_ascii=False), json.dumps(tools, ensure_ascii=False), source, t)


def _ensure_prompt(
    conn: sqlite3.Connection, messages: list[dict[str, Any]], tools: list[Any], source: str, t: float
) -> str:
    pid = _hash("prompt", messages, tools)
    conn.execute(_INSERT_PROMPT, _prompt_row(pid, messages, tools, source, t))
    return pid


def _candidate_row(cid: str, prompt_id: str, turns: list[dict[str, Any]], t: float, **meta: Any) -> tuple[Any, ...]:
    return (
        cid,
        prompt_id,
        _plain_text(turns),
        json.dumps(turns, ensure_ascii=False),
        meta.get("model", ""),
        meta.get("adapter", ""),
        meta.get("run_id", ""),
        meta.get("checkpoint", ""),
        meta.get("seed"),
        json.dumps(meta.get("sampling") or {}, sort_keys=True),
        meta.get("token_count"),
        meta.get("source", ""),
        t,
    )


def _ensure_candidate(
    conn: sqlite3.Connection, prompt_id: str, turns: list[dict[str, Any]], t: float, **meta: Any
) -> str:
    cid = _hash("candidate", prompt_id, turns)
    conn.execute(_INSERT_CANDIDATE, _candidate_row(cid, prompt_id, turns, t, **meta))
    return cid


def _compare(
    conn: sqlite3.Connection,
    a: str,
    b: str,
    decision: Decision,
    *,
    strength: float | None = None,
    shown_left: str = "",
    annotator: str = "",
    source: str = "",
    t: float,
) -> tuple[int, str]:
    """Insert or update the comparison of a and b by annotator; returns (id, 'added'|'unchanged'|'changed')."""
    if a == b:
        raise PreferenceError("a candidate cannot be compared with itself")
    row = conn.execute("SELECT prompt_id FROM candidates WHERE id = ?", (a,)).fetchone()
    other = conn.execute("SELECT prompt_id FROM candidates WHERE id = ?", (b,)).fetchone()
    if row is None or other is None:
        raise PreferenceError(f"unknown candidate {a if row is None else b!r}")
    if row[0] != other[0]:
        raise PreferenceError("the two candidates answer different prompts")
    # Stored with the smaller id first, so that (a, b) and (b, a) are the same comparison.
    if b < a:
        a, b = b, a
        decision = {Decision.A: Decision.B, Decision.B: Decision.A}.get(decision, decision)
    key = _hash("comparison", a, b, annotator)
    found = conn.execute("SELECT id, decision, strength FROM comparisons WHERE key = ?", (key,)).fetchone()
    if found is None:
        cur = conn.execute(
            "INSERT INTO comparisons (key, prompt_id, candidate_a, candidate_b, decision, strength, shown_left, "
            "annotator, source, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, row[0], a, b, decision.value, strength, shown_left, annotator, source, t, t),
        )
        return cast(int, cur.lastrowid), "added"  # an INSERT's row id
    cid, old_decision, old_strength = found
    if old_decision == decision.value and old_strength == strength:
        return cid, "unchanged"
    conn.execute(
        "INSERT INTO decision_changes (comparison_id, old_decision, new_decision, old_strength, new_strength, "
        "annotator, changed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (cid, old_decision, decision.value, old_strength, strength, annotator, t),
    )
    conn.execute(
        "UPDATE comparisons SET decision = ?, strength = ?, shown_left = ?, updated_at = ? WHERE id = ?",
        (decision.value, strength, shown_left, t, cid),
    )
    return cid, "changed"


def _add_pair(
    conn: sqlite3.Connection,
    prompt: str | Sequence[Mapping[str, Any]],
    chosen: str | Sequence[Mapping[str, Any]],
    rejected: str | Sequence[Mapping[str, Any]],
    tools: Iterable[Any],
    *,
    source: str,
    annotator: str,
    t: float,
) -> str:
    pid = _ensure_prompt(conn, _messages(prompt), list(tools), source, t)
    c = _ensure_candidate(conn, pid, _answer_turns(chosen), t, source=source)
    r = _ensure_candidate(conn, pid, _answer_turns(rejected), t, source=source)
    return _compare(conn, c, r, Decision.A, annotator=annotator, source=source, t=t)[1]


class PreferenceStore:
    """The preference tables of one studio database (a :class:`~core.store.Store` gives one as ``.preferences``)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    # --- prompts and candidates ---------------------------------------------------
    def add_prompt(
        self, messages: str | Sequence[Mapping[str, Any]], tools: Sequence[Any] = (), source: str = ""
    ) -> str:
        with transaction(self.conn) as c:
            return _ensure_prompt(c, _messages(messages), list(tools), source, time.time())

    def add_candidate(
        self,
        prompt_id: str,
        answer: str | Sequence[Mapping[str, Any]],
        *,
        model: str = "",
        adapter: str = "",
        run_id: str = "",
        checkpoint: str = "",
        seed: int | None = None,
        sampling: dict[str, Any] | None = None,
        token_count: int | None = None,
        source: str = "",
    ) -> str:
        """Record one answer the moment it exists; the same answer to the same prompt is one candidate."""
        with transaction(self.conn) as c:
            if c.execute("SELECT 1 FROM prompts WHERE id = ?", (prompt_id,)).fetchone() is None:
                raise PreferenceError(f"unknown prompt {prompt_id!r}")
            return _ensure_candidate(
                c,
                prompt_id,
                _answer_turns(answer),
                time.time(),
                model=model,
                adapter=adapter,
                run_id=run_id,
                checkpoint=checkpoint,
                seed=seed,
                sampling=sampling,
                token_count=token_count,
                source=source,
            )

    def candidate(self, candidate_id: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM candidates WHERE id = ?", candidate_id)
        if row is None:
            raise PreferenceError(f"unknown candidate {candidate_id!r}")
        return row

    def candidates(self, prompt_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM candidates WHERE prompt_id = ? ORDER BY created_at, id", prompt_id)

    # --- decisions ----------------------------------------------------------------
    def compare(
        self,
        candidate_a: str,
        candidate_b: str,
        decision: str | Decision,
        *,
        strength: float | None = None,
        shown_left: str = "",
        annotator: str = "",
        source: str = "",
    ) -> int:
        """Record (or change, with an audit row) a decision; returns the comparison id."""
        decision = Decision.parse(decision)
        if strength is not None and not 0 <= strength <= 1:
            raise PreferenceError(f"strength must be between 0 and 1, not {strength!r}")
        with transaction(self.conn) as c:
            cid, _ = _compare(
                c,
                candidate_a,
                candidate_b,
                decision,
                strength=strength,
                shown_left=shown_left,
                annotator=annotator,
                source=source,
                t=time.time(),
            )
            return cid

    def rank(self, candidate_ids: Sequence[str], *, annotator: str = "", source: str = "ranking") -> list[int]:
        """A ranking, best first, of K candidates of one prompt: C(K, 2) comparisons, the better one preferred."""
        if len(set(candidate_ids)) != len(candidate_ids) or len(candidate_ids) < 2:
            raise PreferenceError("rank at least two different candidates")
        t = time.time()
        with transaction(self.conn) as c:
            return [
                _compare(c, better, worse, Decision.A, annotator=annotator, source=source, t=t)[0]
                for i, better in enumerate(candidate_ids)
                for worse in candidate_ids[i + 1 :]
            ]

    def edit(self, original_id: str, new_answer: str | Sequence[Mapping[str, Any]], *, annotator: str = "") -> str:
        """A person's rewrite of a candidate: a new candidate, preferred to the original. Returns its id."""
        t = time.time()
        with transaction(self.conn) as c:
            original = self.candidate(original_id)
            edited = _ensure_candidate(
                c, original["prompt_id"], _answer_turns(new_answer), t, model="edit", source="edit"
            )
            cid, _ = _compare(c, edited, original_id, Decision.A, annotator=annotator, source="edit", t=t)
            c.execute(
                "INSERT INTO edits (original_id, edited_id, comparison_id, annotator, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (original_id, edited, cid, annotator, t),
            )
            return edited

    def comparison(self, comparison_id: int) -> dict[str, Any]:
        row = self._one("SELECT * FROM comparisons WHERE id = ?", comparison_id)
        if row is None:
            raise PreferenceError(f"unknown comparison {comparison_id}")
        return row

    def history(self, comparison_id: int) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM decision_changes WHERE comparison_id = ? ORDER BY id", comparison_id)

    def import_pairs(
        self, pairs: Iterable[dict[str, Any]], *, source: str = "", annotator: str = "import"
    ) -> ImportResult:
        """Pairs {prompt, chosen, rejected, tools?} (strings or message lists): all of them or, when one fails, none.

        A pair the store already gives (the same prompt, chosen and rejected answer, whoever labelled it: a person in
        the app, an earlier import) is unchanged, so importing the store's own export adds nothing. A pair this
        ``annotator`` recorded the other way round is changed (and audited).

        The database's write lock is held only briefly, however long the file (a run writing its metrics, the app
        saving a label, wait no longer than one chunk): prompts and candidates, content-addressed and shown nowhere
        until a comparison names them, are written in transactions of :data:`IMPORT_CHUNK` pairs; the comparisons
        wait in a temporary table (this connection's own, which takes no lock) and enter in one final transaction,
        set-wise. If the import fails, the prompts and candidates it wrote that nothing names are taken out again."""
        t = time.time()
        staged: dict[str, tuple[str, str, str, str]] = {}  # comparison key -> (prompt id, a, b, decision)
        repeats = {"unchanged": 0, "changed": 0}  # a comparison the file gives more than once
        written: dict[str, list[str]] = {"prompts": [], "candidates": []}  # ids this import added
        chunk: list[tuple[str, tuple[Any, ...]]] = []  # (table, row) waiting for the next chunk's transaction
        try:
            for n, p in enumerate(pairs, 1):
                messages, tools = _messages(p["prompt"]), list(p.get("tools") or [])
                pid = _hash("prompt", messages, tools)
                chunk.append(("prompts", _prompt_row(pid, messages, tools, source, t)))
                ids = []
                for answer in (p["chosen"], p["rejected"]):
                    turns = _answer_turns(answer)
                    ids.append(_hash("candidate", pid, turns))
                    chunk.append(("candidates", _candidate_row(ids[-1], pid, turns, t, source=source)))
                chosen, rejected = ids
                if chosen == rejected:
                    raise PreferenceError(f"pair {n}: the chosen and the rejected answer are the same")
                # stored with the smaller id first, as _compare does
                a, b, decision = (chosen, rejected, Decision.A) if chosen < rejected else (rejected, chosen, Decision.B)
                key = _hash("comparison", a, b, annotator)
                if key in staged:
                    repeats["unchanged" if staged[key][3] == decision.value else "changed"] += 1
                staged[key] = (pid, a, b, decision.value)
                if len(chunk) >= 3 * IMPORT_CHUNK:
                    self._write_chunk(chunk, written)
                    chunk = []
            self._write_chunk(chunk, written)
            counts = self._enter_comparisons(staged, annotator=annotator, source=source, t=t)
        except BaseException:
            self._take_out_unnamed(written)
            raise
        finally:
            self.conn.execute("DROP TABLE IF EXISTS temp.import_staged")
        return ImportResult(
            added=counts["added"],
            unchanged=counts["unchanged"] + repeats["unchanged"],
            changed=counts["changed"] + repeats["changed"],
        )

    def _write_chunk(self, chunk: list[tuple[str, tuple[Any, ...]]], written: dict[str, list[str]]) -> None:
        """One short transaction: the chunk's prompts and candidates not yet in the store (their ids noted)."""
        if not chunk:
            return
        with transaction(self.conn) as c:
            for table, row in chunk:
                sql = _INSERT_PROMPT if table == "prompts" else _INSERT_CANDIDATE
                if c.execute(sql, row).rowcount:
                    written[table].append(row[0])

    def _enter_comparisons(
        self, staged: dict[str, tuple[str, str, str, str]], *, annotator: str, source: str, t: float
    ) -> dict[str, int]:
        """The staged comparisons in one transaction, set-wise; counts added, unchanged and changed."""
        c = self.conn
        c.execute("DROP TABLE IF EXISTS temp.import_staged")
        c.execute(
            "CREATE TEMP TABLE import_staged (position INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
            "prompt_id TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL, decision TEXT NOT NULL, "
            "given INTEGER NOT NULL DEFAULT 0)"
        )
        c.executemany(
            "INSERT INTO temp.import_staged (key, prompt_id, a, b, decision) VALUES (?, ?, ?, ?, ?)",
            [(key, *row) for key, row in staged.items()],
        )
        c.execute("CREATE INDEX temp.import_staged_pair ON import_staged (a, b)")
        with transaction(c):
            differs = "(c.decision != s.decision OR c.strength IS NOT NULL)"
            mine = "FROM temp.import_staged s JOIN main.comparisons c ON c.key = s.key"
            changed = c.execute(f"SELECT count(*) {mine} WHERE {differs}").fetchone()[0]
            c.execute(
                "INSERT INTO main.decision_changes (comparison_id, old_decision, new_decision, old_strength, "
                f"new_strength, annotator, changed_at) SELECT c.id, c.decision, s.decision, c.strength, NULL, ?, ? "
                f"{mine} WHERE {differs} ORDER BY s.position",
                (annotator, t),
            )
            c.execute(
                "UPDATE main.comparisons SET decision = s.decision, strength = NULL, shown_left = '', updated_at = ? "
                "FROM temp.import_staged s WHERE comparisons.key = s.key "
                "AND (comparisons.decision != s.decision OR comparisons.strength IS NOT NULL)",
                (t,),
            )
            # Given already: this annotator's own comparison, or another's with the same preferred side.
            c.execute("UPDATE temp.import_staged SET given = 1 WHERE key IN (SELECT key FROM main.comparisons)")
            c.execute(
                "UPDATE temp.import_staged SET given = 1 WHERE position IN (SELECT s.position FROM main.comparisons c "
                "JOIN temp.import_staged s ON s.a = c.candidate_a AND s.b = c.candidate_b AND s.decision = c.decision)"
            )
            added = c.execute(
                "INSERT INTO main.comparisons (key, prompt_id, candidate_a, candidate_b, decision, strength, "
                "shown_left, annotator, source, created_at, updated_at) SELECT key, prompt_id, a, b, decision, NULL, "
                "'', ?, ?, ?, ? FROM temp.import_staged WHERE given = 0 ORDER BY position",
                (annotator, source, t, t),
            ).rowcount
        return {"added": added, "changed": changed, "unchanged": len(staged) - added - changed}

    def _take_out_unnamed(self, written: dict[str, list[str]]) -> None:
        """After a failed import: the prompts and candidates it wrote that no comparison, edit or candidate names."""
        if not (written["prompts"] or written["candidates"]):
            return
        with contextlib.suppress(sqlite3.Error), transaction(self.conn) as c:
            for start in range(0, len(written["candidates"]), IMPORT_CHUNK):
                ids = written["candidates"][start : start + IMPORT_CHUNK]
                marks = ", ".join("?" * len(ids))
                c.execute(
                    f"DELETE FROM candidates WHERE id IN ({marks}) AND NOT EXISTS (SELECT 1 FROM comparisons "
                    "WHERE candidate_a = candidates.id OR candidate_b = candidates.id) AND NOT EXISTS (SELECT 1 "
                    "FROM edits WHERE original_id = candidates.id OR edited_id = candidates.id)",
                    ids,
                )
            for start in range(0, len(written["prompts"]), IMPORT_CHUNK):
                ids = written["prompts"][start : start + IMPORT_CHUNK]
                marks = ", ".join("?" * len(ids))
                c.execute(
                    f"DELETE FROM prompts WHERE id IN ({marks}) AND NOT EXISTS (SELECT 1 FROM candidates "
                    "WHERE prompt_id = prompts.id) AND NOT EXISTS (SELECT 1 FROM comparisons "
                    "WHERE prompt_id = prompts.id)",
                    ids,
                )

    # --- reading pairs ------------------------------------------------------------
    def pairs(self, source: str | None = None) -> list[Pair]:
        """Every DPO pair the comparisons give now (or those of one ``source``), oldest first."""
        where, args = ("WHERE source = ?", (source,)) if source is not None else ("", ())
        rows = self.conn.execute(
            f"SELECT prompt_id, decision, candidate_a, candidate_b FROM comparisons {where} ORDER BY id", args
        ).fetchall()
        out = []
        for prompt_id, decision, a, b in rows:
            d = Decision(decision)
            if d.gives_pair:
                chosen, rejected = (a, b) if d is Decision.A else (b, a)
                out.append(self._pair(prompt_id, chosen, rejected))
        return out

    def left_out(self, source: str | None = None) -> dict[str, int]:
        """Comparisons that give no DPO pair, by decision."""
        where, args = ("WHERE source = ?", (source,)) if source is not None else ("", ())
        rows = self.conn.execute(f"SELECT decision, count(*) FROM comparisons {where} GROUP BY decision", args)
        return {d: n for d, n in rows if not Decision(d).gives_pair}

    def _pair(self, prompt_id: str, chosen: str, rejected: str) -> Pair:
        messages, tools = self.conn.execute("SELECT messages, tools FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        turns = dict(self.conn.execute("SELECT id, turns FROM candidates WHERE id IN (?, ?)", (chosen, rejected)))
        return Pair(
            prompt=json.loads(messages),
            chosen=json.loads(turns[chosen]),
            rejected=json.loads(turns[rejected]),
            tools=json.loads(tools),
            prompt_id=prompt_id,
            chosen_id=chosen,
            rejected_id=rejected,
        )

    # --- snapshots ----------------------------------------------------------------
    def snapshot(self, note: str = "", source: str | None = None) -> Snapshot:
        """Freeze today's pairs (all, or one ``source``'s) under an id: a hash of the pairs, so unchanged data
        gives the same snapshot."""
        pairs = self.pairs(source)
        left_out = self.left_out(source)
        sid = "pairs-" + _hash("snapshot", [(p.prompt_id, p.chosen_id, p.rejected_id) for p in pairs])[:12]
        t = time.time()
        with transaction(self.conn) as c:
            if c.execute("SELECT 1 FROM snapshots WHERE id = ?", (sid,)).fetchone() is None:
                c.execute(
                    "INSERT INTO snapshots (id, created_at, pairs, left_out, note) VALUES (?, ?, ?, ?, ?)",
                    (sid, t, len(pairs), json.dumps(left_out), note),
                )
                c.executemany(
                    "INSERT INTO snapshot_pairs (snapshot_id, position, prompt_id, chosen_id, rejected_id) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(sid, i, p.prompt_id, p.chosen_id, p.rejected_id) for i, p in enumerate(pairs)],
                )
        return self.get_snapshot(sid)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        row = self._one("SELECT * FROM snapshots WHERE id = ?", snapshot_id)
        if row is None:
            known = [r["id"] for r in self.snapshots()[:5]]
            raise PreferenceError(
                f"no pairs snapshot {snapshot_id!r}; "
                + (f"known: {', '.join(known)}" if known else "none exported yet (pairs export, or pairs:latest)")
            )
        return Snapshot(row["id"], row["created_at"], row["pairs"], json.loads(row["left_out"]))

    def snapshots(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM snapshots ORDER BY created_at DESC, id")

    def snapshot_pairs(self, snapshot_id: str) -> list[Pair]:
        self.get_snapshot(snapshot_id)
        rows = self.conn.execute(
            "SELECT prompt_id, chosen_id, rejected_id FROM snapshot_pairs WHERE snapshot_id = ? ORDER BY position",
            (snapshot_id,),
        ).fetchall()
        return [self._pair(*r) for r in rows]

    # --- statistics ---------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        def count(sql: str) -> int:
            return int(self.conn.execute(sql).fetchone()[0])

        decisions = dict(self.conn.execute("SELECT decision, count(*) FROM comparisons GROUP BY decision").fetchall())
        return {
            "prompts": count("SELECT count(*) FROM prompts"),
            "candidates": count("SELECT count(*) FROM candidates"),
            "comparisons": count("SELECT count(*) FROM comparisons"),
            "decisions": {d.value: decisions.get(d.value, 0) for d in Decision},
            "pairs": sum(n for d, n in decisions.items() if Decision(d).gives_pair),
            "edits": count("SELECT count(*) FROM edits"),
            "decision_changes": count("SELECT count(*) FROM decision_changes"),
            "annotators": count("SELECT count(DISTINCT annotator) FROM comparisons"),
            "snapshots": count("SELECT count(*) FROM snapshots"),
        }

    # --- helpers ------------------------------------------------------------------
    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = self._all(sql, *args)
        return rows[0] if rows else None
