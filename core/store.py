"""The studio's SQLite database: runs, their step metrics, samples and rollouts, the preference store
(``core.preferences``).

The engine writes as it trains; the studio reads (and writes labels). WAL mode
lets one writer and many readers work at once, and every write is committed at
once, so a crashed or closed app loses nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import sqlite3
import time
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from finetune_studio.core import paths, preferences
from finetune_studio.core.protocol.distill_report import DistillSpeed
from finetune_studio.core.protocol.events import Eval, Step
from finetune_studio.core.run_status import (  # noqa: F401 - RUN_STATUSES: still importable here
    RUN_STATUSES,
    RunStatus,
    parse_status,
)

log = logging.getLogger(__name__)

# How long a write waits for another connection's write lock before it fails with "database is locked", in ms.
# FINETUNE_STUDIO_DB_BUSY_MS overrides it (tests that hold a lock past it need not wait 30 s).
BUSY_TIMEOUT_MS = 30_000
BUSY_TIMEOUT_ENV = "FINETUNE_STUDIO_DB_BUSY_MS"
# A store that keeps its writes while the database is busy (see Store.keep_writes_when_busy) tries them this long
# during a run (each later write tries again), and, when it closes, waits its busy timeout per try for this long.
KEPT_WRITE_TRY_MS = 200
KEPT_WRITE_RETRY_S = 1.0  # during a run, kept writes are tried again at most this often (a later write keeps too)
KEPT_WRITES_FINAL_WAIT_S = 600.0

# Fields of the Step and Eval events that are not a step's figures: the row's key (step), the run's length, and
# early stopping's best-so-far (kept on the run's row: best_step, best_eval_loss).
NOT_METRICS = frozenset({"step", "total_steps", "best_eval_loss", "best_step", "is_best"})


def _metric_columns() -> dict[str, type]:
    """The metrics table's columns beyond (run_id, kind, step): every number of the ``Step`` and ``Eval`` events, in
    their order (a train row fills Step's, an eval row Eval's), then when the row was written."""
    columns: dict[str, type] = {}
    for event in (Step, Eval):
        hints = typing.get_type_hints(event)
        for f in dataclasses.fields(event):
            kind = _NUMBERS.get(hints[f.name])
            if kind is not None and f.name not in NOT_METRICS and f.name not in columns:
                columns[f.name] = kind
    columns["time"] = float
    return columns


# A figure's type in the events -> its column's (fields of other types, such as an objective's ``metrics`` by name,
# are not columns).
_NUMBERS: dict[object, type] = {int: int, float: float, float | None: float, int | None: int}


METRIC_COLUMNS = _metric_columns()  # name -> int or float
# An objective's own figures (a Step's or Eval's ``metrics``, by name: GRPO's ``reward/<name>``, ``kl``...), one row
# per figure, as the names differ from run to run.
NAMED_METRICS_SQL = (
    "CREATE TABLE IF NOT EXISTS named_metrics (run_id TEXT NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL, "
    "name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (run_id, kind, step, name))"
)
# What an online RL objective sampled (the ``rollouts`` event's items), one row per answer, with its scores: any of
# them can be sent to be labelled.
ROLLOUTS_SQL = (
    "CREATE TABLE IF NOT EXISTS rollouts (run_id TEXT NOT NULL, step INTEGER NOT NULL, position INTEGER NOT NULL, "
    "grp INTEGER NOT NULL, prompt TEXT NOT NULL, completion TEXT NOT NULL, reward REAL NOT NULL, "
    "rewards TEXT NOT NULL, advantage REAL NOT NULL, PRIMARY KEY (run_id, step, position))"
)
SCHEMA_VERSION = 2  # 2: the preference store (core/preferences.py), run lineage, samples, best checkpoint
# Run columns added without a schema version of their own, created on open where missing (older databases work).
LATER_RUN_COLUMNS = {
    "memory_estimate": str,  # core.protocol.memory_report.MemoryReport as JSON: the budget the run started with
    "memory_reserved_peak_bytes": int,  # CUDA: the allocator's reserved peak (memory_peak_bytes: allocated)
    "pid_start": str,  # the engine process's start time beside its pid (a pid alone can be reused)
}


class _ReadByKey:
    """Lets a record be read as the dict it replaced (``row["id"]``, ``row.get("status")``), for the readers not yet
    moved to its attributes; a name that is no field raises KeyError, as a missing dict key did."""

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name, None) if name in self._names() else None
        return default if value is None else value

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def keys(self) -> Iterator[str]:
        return iter(self._names())

    @classmethod
    def _names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def _from_row(cls, row: dict[str, Any]) -> Any:
        """A record from a database row: unknown columns (a newer app's) are ignored, a NULL takes the default."""
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = row.get(f.name)
            if value is not None or (f.name in row and f.default is None):
                values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class RunRecord(_ReadByKey):
    """One run as the database holds it (a row of ``runs``)."""

    id: str
    status: RunStatus  # interrupted when it was running and its process is gone
    name: str = ""
    model: str = ""
    dataset: str = ""
    method: str = ""
    objective: str = ""
    config: str = "{}"  # the run's TrainConfig as JSON (see config_dict)
    run_dir: str = ""
    pid: int | None = None
    pid_start: str = ""  # the process's start time beside its pid (a pid alone can be reused)
    device: str = ""
    created_at: float | None = None
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    error: str = ""
    error_kind: str = ""  # core.protocol.events.FailureKind's value
    adapter_dir: str = ""
    memory_budget_bytes: int = 0
    memory_peak_bytes: int = 0
    memory_reserved_peak_bytes: int = 0
    memory_estimate: str = ""  # core.protocol.memory_report.MemoryReport as JSON ('' for older runs)
    parent_run_id: str = ""
    init_adapter: str = ""
    pairs_snapshot: str = ""
    best_step: int | None = None
    best_eval_loss: float | None = None
    best_checkpoint: str = ""

    def __post_init__(self) -> None:
        status = parse_status(self.status)
        if status is None:
            raise ValueError(f"run {self.id}: {self.status!r} is no run status")
        object.__setattr__(self, "status", status)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRecord:
        return typing.cast(RunRecord, cls._from_row(row))

    def config_dict(self) -> dict[str, Any]:
        """The run's config as a dict ({} when the stored text is not a JSON object)."""
        try:
            value = json.loads(self.config or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class MetricRow(_ReadByKey):
    """One step's figures (a row of ``metrics``): a train row has the ``Step`` event's, an eval row the ``Eval``
    event's; the others are None. Its fields are :data:`METRIC_COLUMNS` (a test keeps them so)."""

    run_id: str
    kind: str  # "train" | "eval"
    step: int
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    memory_used_bytes: int | None = None
    memory_peak_bytes: int | None = None
    epoch: float | None = None
    elapsed_s: float | None = None
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    eval_loss: float | None = None
    time: float | None = None  # when the row was written (seconds since the epoch)

    def figures(self) -> dict[str, float | int | None]:
        """The row's figures by column name (for column stores such as the studio's curves)."""
        return {name: getattr(self, name) for name in METRIC_COLUMNS} | {"step": self.step}


@dataclass(frozen=True)
class SampleRow(_ReadByKey):
    """What the model answered to one fixed prompt at one evaluation (a row of ``samples``)."""

    run_id: str
    step: int
    position: int  # the prompt's place among the run's sample prompts
    prompt: str
    answer: str


@dataclass(frozen=True)
class RolloutRow:
    """One answer an online RL step sampled, with its scores (a row of ``rollouts``; an item of the ``rollouts``
    event, :mod:`core.protocol.rollouts`)."""

    run_id: str
    step: int
    position: int  # its place among the step's answers
    group: int  # the step's prompt it answers (the G answers of one prompt share it)
    prompt: str
    completion: str
    reward: float  # the weighted total
    rewards: dict[str, float]  # each reward function's score by name
    advantage: float


def now() -> float:
    return time.time()


def new_run_id() -> str:
    """Sortable by creation time, unique across processes."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def process_start(pid: int | None) -> str:
    """What tells process ``pid`` apart from a later process given the same pid: its start time ('' when
    unknown). Linux: the boot id and field 22 of /proc/<pid>/stat (clock ticks since boot); elsewhere
    psutil's create time when psutil is installed."""
    if not pid:
        return ""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        ticks = stat[stat.rindex(")") + 2 :].split()[19]  # fields from 3 (state) on; starttime is field 22
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{ticks}"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return f"psutil:{psutil.Process(int(pid)).create_time():.3f}"
    except Exception:  # no psutil, or no such process
        return ""


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    """Whether process ``pid`` lives and, when its recorded ``start`` is given, is still that same process."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    if start:
        now_start = process_start(pid)
        if now_start and now_start != start:
            return False  # the pid was reused by another process
    return True


def signal_process(pid: int | None, start: str | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process recorded with ``start``; False when it is gone.
    On Linux a pidfd pins the process between the check and the signal, so no unrelated process is hit."""
    import signal as _signal

    if not pid_alive(pid, start):
        return False
    assert pid is not None  # pid_alive() is False for None
    try:
        fd = os.pidfd_open(int(pid))
    except (AttributeError, OSError):  # not Linux, or an old kernel: check-then-kill
        try:
            os.kill(int(pid), sig)
        except OSError:
            return False
        return True
    try:
        if not pid_alive(pid, start):
            return False
        _signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class DatabaseDamaged(Exception):
    """The database file cannot be used; the message names the file and what to do."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"the database {self.path} is damaged ({reason}). Recover it: the damaged file is kept (renamed "
            "*.corrupt-<time>), a fresh database is started and every readable row is copied into it; open the app, "
            "or run `python -m finetune_studio.engine db recover`"
        )


def default_busy_timeout_ms() -> int:
    """The busy timeout a store opens with: :data:`BUSY_TIMEOUT_MS`, or the number in FINETUNE_STUDIO_DB_BUSY_MS."""
    value = os.environ.get(BUSY_TIMEOUT_ENV, "").strip()
    try:
        return max(0, int(value)) if value else BUSY_TIMEOUT_MS
    except ValueError:
        return BUSY_TIMEOUT_MS


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` says another connection holds the database ("database is locked"), not that it is damaged."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc)


class Store:
    """A handle on the database. Cheap to open; open one per process.

    ``busy_timeout_ms``: how long a write waits for another connection's write lock (default
    :func:`default_busy_timeout_ms`)."""

    def __init__(self, path: str | Path | None = None, *, busy_timeout_ms: int | None = None):
        self.path = Path(path) if path else paths.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_ms = default_busy_timeout_ms() if busy_timeout_ms is None else busy_timeout_ms
        # Writes kept while the database was busy, oldest first (only with keep_writes_when_busy()).
        self._kept: collections.deque[Callable[[], object]] | None = None
        self._next_try = 0.0  # time.monotonic() before which a run's kept writes are not tried again
        conn = sqlite3.connect(
            str(self.path), timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            self.db = sqlite_utils.Database(conn)
            if self.db.journal_mode != "wal":
                self.db.enable_wal()
            self._migrate()
            self._add_later_columns()
            self._add_later_tables()
            self.preferences = preferences.PreferenceStore(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if type(exc) is sqlite3.DatabaseError:  # "file is not a database", "malformed"; not "locked"
                raise DatabaseDamaged(self.path, str(exc)) from None
            raise

    def close(self) -> None:
        """Close the connection, after making the writes kept while the database was busy (waiting for it)."""
        try:
            if self._kept:
                self._flush_kept(final=True)
        finally:
            self.db.conn.close()

    # --- writes that wait for a busy database ----------------------------------
    def keep_writes_when_busy(self) -> None:
        """From now on the run's writes (its row, metrics, samples) never fail because another process holds the
        database: a write that finds it locked is kept, in order, and tried again at each later write (each try
        waits only :data:`KEPT_WRITE_TRY_MS`, so training does not stall), and :meth:`close` waits for the lock to
        make them all. Every such write is idempotent (an upsert or an update), so a try that half-happened is
        simply made again."""
        if self._kept is None:
            self._kept = collections.deque()

    @property
    def kept_writes(self) -> int:
        """How many writes wait for the database (0 unless keep_writes_when_busy() and it was busy)."""
        return len(self._kept or ())

    def _write(self, write: Callable[[], object]) -> None:
        if self._kept is None:
            write()
            return
        self._kept.append(write)
        self._flush_kept(final=False)

    def flush(self) -> bool:
        """Try the kept writes now (a short wait); True when none is left."""
        return self._flush_kept(final=False)

    def _flush_kept(self, *, final: bool) -> bool:
        """Make the kept writes in order. During a run each try waits KEPT_WRITE_TRY_MS; ``final`` (closing) waits
        the busy timeout per try, and goes on trying for KEPT_WRITES_FINAL_WAIT_S."""
        kept = self._kept
        if not kept:
            return True
        if not final and len(kept) > 1 and time.monotonic() < self._next_try:
            return False  # tried a moment ago: keep this write behind the others, training goes on
        conn = self.db.conn
        wait_ms = self.busy_timeout_ms if final else min(KEPT_WRITE_TRY_MS, self.busy_timeout_ms)
        give_up = time.monotonic() + KEPT_WRITES_FINAL_WAIT_S
        conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        try:
            while kept:
                try:
                    kept[0]()
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc):
                        raise
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if not final:
                        self._next_try = time.monotonic() + KEPT_WRITE_RETRY_S
                        return False
                    if time.monotonic() > give_up:
                        log.error(
                            "the database %s stayed locked for %.0f s: %d writes of this run were not made (the "
                            "run's events.jsonl holds its events)",
                            self.path,
                            KEPT_WRITES_FINAL_WAIT_S,
                            len(kept),
                        )
                        return False
                    time.sleep(0.05)
                    continue
                kept.popleft()
            return True
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")

    # --- schema -------------------------------------------------------------
    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            self._create_v1()
        if version < 2:
            with preferences.transaction(self.db.conn) as conn:
                if conn.execute("PRAGMA user_version").fetchone()[0] < 2:  # another process may have been first
                    preferences.migrate_v2(conn)
                    conn.execute("PRAGMA user_version = 2")

    def _create_v1(self) -> None:
        with self.db.conn:
            self.db.table("runs").create(
                {
                    "id": str,
                    "name": str,
                    "status": str,
                    "model": str,
                    "dataset": str,
                    "method": str,
                    "objective": str,
                    "config": str,
                    "run_dir": str,
                    "pid": int,
                    "device": str,
                    "created_at": float,
                    "started_at": float,
                    "updated_at": float,
                    "finished_at": float,
                    "step": int,
                    "total_steps": int,
                    "final_loss": float,
                    "eval_loss": float,
                    "error": str,
                    "error_kind": str,
                    "adapter_dir": str,
                    "memory_budget_bytes": int,
                    "memory_peak_bytes": int,
                    "parent_run_id": str,
                },
                pk="id",
                not_null={"status", "config"},
                defaults={"status": RunStatus.CREATED.value, "step": 0},
                if_not_exists=True,
            )
            self.db.table("metrics").create(
                {"run_id": str, "kind": str, "step": int, **METRIC_COLUMNS},
                pk=("run_id", "kind", "step"),
                foreign_keys=[("run_id", "runs", "id")],
                if_not_exists=True,
            )
            self.db.table("preference_pairs").create(
                {
                    "id": int,
                    "prompt": str,
                    "chosen": str,
                    "rejected": str,
                    "source": str,
                    "created_at": float,
                    "updated_at": float,
                    "note": str,
                },
                pk="id",
                if_not_exists=True,
            )
            self.db.execute("PRAGMA user_version = 1")

    def _add_later_columns(self) -> None:
        have = set(self.db["runs"].columns_dict)
        for name, kind in LATER_RUN_COLUMNS.items():
            if name not in have:
                try:
                    self.db.table("runs").add_column(name, kind)
                except sqlite3.OperationalError:  # another process added it meanwhile
                    pass

    def _add_later_tables(self) -> None:
        """Tables added without a schema version of their own, created on open where missing."""
        have = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        if "named_metrics" not in have:
            self.db.execute(NAMED_METRICS_SQL)
        if "rollouts" not in have:
            self.db.execute(ROLLOUTS_SQL)

    # --- runs ---------------------------------------------------------------
    def create_run(
        self,
        config: dict[str, Any],
        *,
        run_id: str | None = None,
        run_dir: str = "",
        name: str = "",
        parent_run_id: str = "",
    ) -> str:
        run_id = run_id or new_run_id()
        t = now()
        self.db.table("runs").insert(
            {
                "id": run_id,
                "name": name or config.get("run_name") or run_id,
                "status": RunStatus.CREATED.value,
                "model": config.get("model", ""),
                "dataset": config.get("dataset", ""),
                "method": config.get("method", ""),
                "objective": config.get("objective", ""),
                "config": json.dumps(config, sort_keys=True),
                "run_dir": run_dir,
                "created_at": t,
                "updated_at": t,
                "step": 0,
                "total_steps": config.get("max_steps", 0),
                "parent_run_id": parent_run_id,
            }
        )
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._write(lambda: self.db.table("runs").update(run_id, {**fields, "updated_at": now()}))

    def get_run(self, run_id: str) -> RunRecord | None:
        try:
            row = self.db.table("runs").get(run_id)
        except sqlite_utils.db.NotFoundError:
            return None
        return self._record(row)

    def find_run(self, ref: str) -> RunRecord | None:
        """A run by id, by unique id prefix, or by its run folder."""
        run = self.get_run(ref)
        if run:
            return run
        p = Path(ref)
        if p.exists():
            folder = p.resolve()
            stored = [str(folder), paths.stored_run_dir(folder, self.path.parent)]
            rows = list(self.db["runs"].rows_where("run_dir in (?, ?)", stored))
            if rows:
                return self._record(rows[0])
            moved = self.get_run(folder.name)  # a copied or moved home's run, recorded by its old folder
            if moved is not None and Path(moved.run_dir).resolve() == folder:
                return moved
        rows = list(self.db["runs"].rows_where("id like ?", [ref + "%"], limit=2))
        return self._record(rows[0]) if len(rows) == 1 else None

    def list_runs(self, *, status: str | None = None, order_by: str = "created_at desc") -> list[RunRecord]:
        where, args = ("status = ?", [status]) if status else (None, [])
        return [self._record(r) for r in self.db["runs"].rows_where(where, args, order_by=order_by)]

    def _record(self, row: dict[str, Any]) -> RunRecord:
        """The row as a record. A run marked running whose process is gone was interrupted (crash, kill, power cut);
        a status this app does not know (a newer app's) reads as interrupted too. The run's folders are read from
        the data home beside the database (core.paths.resolve_run_dir: a copied or moved home finds its own)."""
        status = parse_status(row.get("status") or RunStatus.CREATED) or RunStatus.INTERRUPTED
        if status == RunStatus.RUNNING and not pid_alive(row.get("pid"), row.get("pid_start")):
            status = RunStatus.INTERRUPTED
        home = self.path.parent
        stored_dir = row.get("run_dir") or ""
        run_dir = paths.resolve_run_dir(stored_dir, str(row.get("id") or ""), home)
        folders: dict[str, Any] = {
            name: paths.resolve_in_run(row.get(name) or "", stored_dir, run_dir, home)
            for name in ("adapter_dir", "best_checkpoint")
            if name in row
        }
        return RunRecord.from_row({**row, "status": status, "run_dir": run_dir, **folders})

    def run_config(self, run_id: str) -> dict[str, Any]:
        run = self.get_run(run_id)
        return run.config_dict() if run else {}

    # --- metrics ------------------------------------------------------------
    def add_metrics(self, run_id: str, kind: str, step: int, values: dict[str, Any]) -> None:
        """One step's figures: the columns' (:data:`METRIC_COLUMNS`), and an objective's own figures by name under
        ``values["metrics"]`` (a Step's or Eval's ``metrics``: GRPO's ``reward/<name>``, ``kl``...)."""
        row = {"run_id": run_id, "kind": kind, "step": step, "time": now()}
        row.update({k: v for k, v in values.items() if k in METRIC_COLUMNS and v is not None})
        named = [
            (run_id, kind, step, str(k), float(v))
            for k, v in (values.get("metrics") or {}).items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]

        def write() -> None:
            self.db.table("metrics").upsert(row, pk=("run_id", "kind", "step"))
            if named:  # a write kept while busy is made again whole: both parts are upserts
                with preferences.transaction(self.db.conn) as conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO named_metrics (run_id, kind, step, name, value) VALUES (?, ?, ?, ?, ?)",
                        named,
                    )

        self._write(write)

    def named_metrics(self, run_id: str, kind: str = "train", since_step: int = -1) -> dict[int, dict[str, float]]:
        """An objective's own figures by step, then by name (what ``add_metrics`` got as ``values["metrics"]``)."""
        out: dict[int, dict[str, float]] = {}
        rows = self.db.execute(
            "SELECT step, name, value FROM named_metrics WHERE run_id = ? AND kind = ? AND step > ? ORDER BY step",
            [run_id, kind, since_step],
        ).fetchall()
        for step, name, value in rows:
            out.setdefault(int(step), {})[name] = float(value)
        return out

    def add_distill_speed(self, run_id: str, speed: DistillSpeed) -> None:
        """A distillation run's generation speed (the ``distill_speed`` event), kept as named figures of kind
        ``speed`` at step 0; a second one for the run (a resumed run measured again) replaces the first."""
        rows = [(run_id, "speed", 0, name, float(getattr(speed, name))) for name in DistillSpeed.FIELDS]

        def write() -> None:
            with preferences.transaction(self.db.conn) as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO named_metrics (run_id, kind, step, name, value) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )

        self._write(write)

    def distill_speed(self, run_id: str) -> DistillSpeed | None:
        """The run's ``distill_speed`` event as stored (None when the run measured none)."""
        figures = self.named_metrics(run_id, "speed").get(0)
        if not figures:
            return None
        return DistillSpeed.from_fields(figures)

    def metrics(self, run_id: str, kind: str = "train", since_step: int = -1) -> list[MetricRow]:
        rows = self.db["metrics"].rows_where(
            "run_id = ? and kind = ? and step > ?", [run_id, kind, since_step], order_by="step"
        )
        return [typing.cast(MetricRow, MetricRow._from_row(r)) for r in rows]

    def delete_metrics_after(self, run_id: str, step: int) -> None:
        """A resumed run re-trains the steps after its checkpoint: drop their old rows."""

        def write() -> None:
            with preferences.transaction(self.db.conn) as conn:
                conn.execute("delete from metrics where run_id = ? and step > ?", [run_id, step])
                conn.execute("delete from named_metrics where run_id = ? and step > ?", [run_id, step])
                conn.execute("delete from rollouts where run_id = ? and step > ?", [run_id, step])

        self._write(write)

    def lineage(self, run_id: str) -> list[RunRecord]:
        """The run and the runs it started from (``init_adapter``), oldest first."""
        chain: list[RunRecord] = []
        run = self.find_run(run_id)
        while run is not None and all(r.id != run.id for r in chain):
            chain.append(run)
            run = self.get_run(run.parent_run_id) if run.parent_run_id else None
        return chain[::-1]

    def children(self, run_id: str) -> list[RunRecord]:
        return [self._record(r) for r in self.db["runs"].rows_where("parent_run_id = ?", [run_id])]

    # --- samples: what the model answered to fixed prompts at each evaluation ------
    def add_samples(self, run_id: str, step: int, prompts: list[str], answers: list[str]) -> None:
        rows = [(run_id, step, i, p, a) for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]

        def write() -> None:
            with preferences.transaction(self.db.conn) as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO samples (run_id, step, position, prompt, answer) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )

        self._write(write)

    def samples(self, run_id: str) -> list[SampleRow]:
        rows = self.db["samples"].rows_where("run_id = ?", [run_id], order_by="step, position")
        return [typing.cast(SampleRow, SampleRow._from_row(r)) for r in rows]

    # --- rollouts: what an online RL objective sampled at each step, with its scores --------
    def add_rollouts(self, run_id: str, step: int, items: list[dict[str, Any]]) -> None:
        """One step's sampled answers (the ``rollouts`` event's items: prompt, completion, reward, rewards by name,
        advantage, group), kept in their order; a step written again (a resumed run) replaces its rows."""
        rows = [
            (
                run_id,
                step,
                i,
                int(item["group"]),
                str(item["prompt"]),
                str(item["completion"]),
                float(item["reward"]),
                json.dumps({str(k): float(v) for k, v in dict(item.get("rewards") or {}).items()}, allow_nan=False),
                float(item["advantage"]),
            )
            for i, item in enumerate(items)
        ]

        def write() -> None:
            with preferences.transaction(self.db.conn) as conn:
                conn.execute("DELETE FROM rollouts WHERE run_id = ? AND step = ?", [run_id, step])
                conn.executemany(
                    "INSERT INTO rollouts (run_id, step, position, grp, prompt, completion, reward, rewards, "
                    "advantage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        self._write(write)

    def rollouts(self, run_id: str, since_step: int = -1) -> list[RolloutRow]:
        """The run's sampled answers after ``since_step``, by step and then in their order."""
        found = self.db.execute(
            "SELECT step, position, grp, prompt, completion, reward, rewards, advantage FROM rollouts "
            "WHERE run_id = ? AND step > ? ORDER BY step, position",
            [run_id, since_step],
        ).fetchall()
        return [
            RolloutRow(run_id, int(step), int(pos), int(grp), prompt, completion, float(reward), _scores(rewards), adv)
            for step, pos, grp, prompt, completion, reward, rewards, adv in found
        ]

    # --- preference pairs (see core/preferences.py) -----------------------------
    def add_pairs(self, pairs: Iterable[dict[str, Any]], source: str = "") -> int:
        """Import {prompt, chosen, rejected} pairs; returns how many were new."""
        return self.preferences.import_pairs(pairs, source=source).added

    def pairs(self) -> list[preferences.Pair]:
        return self.preferences.pairs()


def _scores(text: str) -> dict[str, float]:
    """A rollout's per-function scores as stored (JSON); text that is not such an object reads as none."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}
