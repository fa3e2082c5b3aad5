"""The studio's SQLite database: runs, their step metrics and samples, the preference store (``core.preferences``).

The engine writes as it trains; the studio reads (and writes labels). WAL mode
lets one writer and many readers work at once, and every write is committed at
once, so a crashed or closed app loses nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlite_utils

from finetune_studio.core import paths, preferences
from finetune_studio.core.run_status import RUN_STATUSES, RunStatus  # noqa: F401 - RUN_STATUSES: still importable here

# Columns of the metrics table beyond (run_id, kind, step).
METRIC_COLUMNS = {
    "loss": float,
    "lr": float,
    "grad_norm": float,
    "tokens_per_s": float,
    "memory_used_bytes": int,
    "memory_peak_bytes": int,
    "epoch": float,
    "elapsed_s": float,
    "reward_chosen": float,
    "reward_rejected": float,
    "reward_margin": float,
    "reward_accuracy": float,
    "eval_loss": float,
    "time": float,
}
SCHEMA_VERSION = 2  # 2: the preference store (core/preferences.py), run lineage, samples, best checkpoint
# Run columns added without a schema version of their own, created on open where missing (older databases work).
LATER_RUN_COLUMNS = {
    "memory_estimate": str,  # core.protocol.memory_report.MemoryReport as JSON: the budget the run started with
    "memory_reserved_peak_bytes": int,  # CUDA: the allocator's reserved peak (memory_peak_bytes: allocated)
    "pid_start": str,  # the engine process's start time beside its pid (a pid alone can be reused)
}


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


class Store:
    """A handle on the database. Cheap to open; open one per process."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else paths.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            self.db = sqlite_utils.Database(conn)
            if self.db.journal_mode != "wal":
                self.db.enable_wal()
            self._migrate()
            self._add_later_columns()
            self.preferences = preferences.PreferenceStore(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if type(exc) is sqlite3.DatabaseError:  # "file is not a database", "malformed"; not "locked"
                from finetune_studio.core.db_recovery import DatabaseDamaged

                raise DatabaseDamaged(self.path, str(exc)) from None
            raise

    def close(self) -> None:
        self.db.conn.close()

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

    # --- runs ---------------------------------------------------------------
    def create_run(
        self, config: dict, *, run_id: str | None = None, run_dir: str = "", name: str = "", parent_run_id: str = ""
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
        fields["updated_at"] = now()
        self.db.table("runs").update(run_id, fields)

    def get_run(self, run_id: str) -> dict | None:
        try:
            row = self.db.table("runs").get(run_id)
        except sqlite_utils.db.NotFoundError:
            return None
        return self._with_liveness(row)

    def find_run(self, ref: str) -> dict | None:
        """A run by id, by unique id prefix, or by its run folder."""
        run = self.get_run(ref)
        if run:
            return run
        p = Path(ref)
        if p.exists():
            rows = list(self.db["runs"].rows_where("run_dir = ?", [str(p.resolve())]))
            if rows:
                return self._with_liveness(rows[0])
        rows = list(self.db["runs"].rows_where("id like ?", [ref + "%"], limit=2))
        return self._with_liveness(rows[0]) if len(rows) == 1 else None

    def list_runs(self, *, status: str | None = None, order_by: str = "created_at desc") -> list[dict]:
        where, args = ("status = ?", [status]) if status else (None, [])
        return [self._with_liveness(r) for r in self.db["runs"].rows_where(where, args, order_by=order_by)]

    @staticmethod
    def _with_liveness(row: dict) -> dict:
        """A run marked running whose process is gone was interrupted (crash, kill, power cut)."""
        if row.get("status") == RunStatus.RUNNING and not pid_alive(row.get("pid"), row.get("pid_start")):
            row = dict(row, status=RunStatus.INTERRUPTED.value)
        return row

    def run_config(self, run_id: str) -> dict:
        run = self.get_run(run_id)
        return json.loads(run["config"]) if run else {}

    # --- metrics ------------------------------------------------------------
    def add_metrics(self, run_id: str, kind: str, step: int, values: dict) -> None:
        row = {"run_id": run_id, "kind": kind, "step": step, "time": now()}
        row.update({k: v for k, v in values.items() if k in METRIC_COLUMNS and v is not None})
        self.db.table("metrics").upsert(row, pk=("run_id", "kind", "step"))

    def metrics(self, run_id: str, kind: str = "train", since_step: int = -1) -> list[dict]:
        return list(
            self.db["metrics"].rows_where(
                "run_id = ? and kind = ? and step > ?", [run_id, kind, since_step], order_by="step"
            )
        )

    def delete_metrics_after(self, run_id: str, step: int) -> None:
        """A resumed run re-trains the steps after its checkpoint: drop their old rows."""
        self.db.execute("delete from metrics where run_id = ? and step > ?", [run_id, step])

    def lineage(self, run_id: str) -> list[dict]:
        """The run and the runs it started from (``init_adapter``), oldest first."""
        chain: list[dict] = []
        run = self.find_run(run_id)
        while run is not None and all(r["id"] != run["id"] for r in chain):
            chain.append(run)
            run = self.get_run(run["parent_run_id"]) if run.get("parent_run_id") else None
        return chain[::-1]

    def children(self, run_id: str) -> list[dict]:
        return [self._with_liveness(r) for r in self.db["runs"].rows_where("parent_run_id = ?", [run_id])]

    # --- samples: what the model answered to fixed prompts at each evaluation ------
    def add_samples(self, run_id: str, step: int, prompts: list[str], answers: list[str]) -> None:
        with preferences.transaction(self.db.conn) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO samples (run_id, step, position, prompt, answer) VALUES (?, ?, ?, ?, ?)",
                [(run_id, step, i, p, a) for i, (p, a) in enumerate(zip(prompts, answers, strict=True))],
            )

    def samples(self, run_id: str) -> list[dict]:
        return list(self.db["samples"].rows_where("run_id = ?", [run_id], order_by="step, position"))

    # --- preference pairs (see core/preferences.py) -----------------------------
    def add_pairs(self, pairs: Iterable[dict], source: str = "") -> int:
        """Import {prompt, chosen, rejected} pairs; returns how many were new."""
        return self.preferences.import_pairs(pairs, source=source).added

    def pairs(self) -> list[preferences.Pair]:
        return self.preferences.pairs()
