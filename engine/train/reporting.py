"""Where a run's events go: stdout (JSON lines), ``<run_dir>/events.jsonl`` and the SQLite store.

stdout may vanish (the app that started the run was closed and the run lets go on): a broken pipe stops
the stdout copy and nothing else. The store and events.jsonl stay complete.

Another process may hold the database's write lock for longer than its busy timeout (a long import, a backup): the
run never fails for that. events.jsonl is written first; the store keeps the writes it could not make and makes them,
in order, at a later step or when the run ends (``Store.keep_writes_when_busy``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from finetune_studio.core.protocol import events as ev
from finetune_studio.core.protocol.distill_report import DistillSpeed
from finetune_studio.core.protocol.rollouts import Rollouts
from finetune_studio.core.store import Store
from finetune_studio.engine import logs

log = logging.getLogger(__name__)


class Reporter:
    """Emit events to ``stream`` (the CLI passes the real stdout; in-process callers pass none) and to
    ``extra``, an optional in-process listener (the demo and tests use it)."""

    def __init__(self, stream=None, extra: Callable[[ev.Event], None] | None = None):
        self.stream = stream
        self.extra = extra
        self.store: Store | None = None
        self.run_id = ""
        self._events_file: TextIO | None = None
        self.run_dir: Path | None = None
        self._busy_told = False  # the log already says the database is busy and the figures are kept

    def attach_run(self, store: Store, run_id: str, run_dir: Path) -> None:
        self.store, self.run_id, self.run_dir = store, run_id, Path(run_dir)
        store.keep_writes_when_busy()  # a database busy past its timeout never fails the run (see the module)
        self._events_file = open(Path(run_dir) / "events.jsonl", "a", encoding="utf-8")
        logs.attach_run_dir(Path(run_dir))

    def close(self) -> None:
        if self._events_file:
            self._events_file.close()
            self._events_file = None

    def emit(self, event: ev.Event) -> None:
        line = event.to_json()
        if self.stream is not None:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.stream = None  # the reader is gone; keep training, keep recording
                self._logs_to_file()
        if self._events_file:
            self._events_file.write(line + "\n")
            self._events_file.flush()
        if self.store and self.run_id:
            self._record(event)
            self._tell_busy(self.store.kept_writes)
        if self.extra:
            self.extra(event)

    def _tell_busy(self, kept: int) -> None:
        """Say once when the database is busy and the run keeps its figures, and once when they are written."""
        if kept and not self._busy_told:
            self._busy_told = True
            self.log(
                "The database is busy (another process holds it): this run keeps its figures and writes them when "
                "it is free; training goes on.",
                level="warning",
            )
        elif not kept and self._busy_told:
            self._busy_told = False
            self.log("The database is free again: the kept figures are written.")

    def _logs_to_file(self) -> None:
        """The app let the run go on without it: its stderr pipe is gone too, so logs go to ``engine.log``."""
        if self.run_dir is None:
            return
        logs.stop_run_log()  # log records already go to engine.log; what C code or print() writes follows them
        fd = os.open(self.run_dir / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)
        log.info("event stream closed by its reader; logging to %s", self.run_dir / "engine.log")

    def _record(self, event: ev.Event) -> None:
        s, rid = self.store, self.run_id
        assert s is not None  # only called with a store attached
        if isinstance(event, ev.Step):
            values = {
                k: getattr(event, k)
                for k in (
                    "loss",
                    "lr",
                    "grad_norm",
                    "tokens_per_s",
                    "memory_used_bytes",
                    "memory_peak_bytes",
                    "epoch",
                    "elapsed_s",
                    "reward_chosen",
                    "reward_rejected",
                    "reward_margin",
                    "reward_accuracy",
                )
            }
            values["metrics"] = event.metrics  # an objective's own figures by name (GRPO's reward/<name>, kl...)
            s.add_metrics(rid, "train", event.step, values)
            s.update_run(rid, step=event.step, final_loss=event.loss, memory_peak_bytes=event.memory_peak_bytes)
        elif isinstance(event, ev.Eval):
            s.add_metrics(
                rid,
                "eval",
                event.step,
                {
                    "eval_loss": event.eval_loss,
                    "reward_margin": event.reward_margin,
                    "reward_accuracy": event.reward_accuracy,
                    "metrics": event.metrics,
                },
            )
            s.update_run(rid, eval_loss=event.eval_loss)
        elif isinstance(event, ev.Sample):
            s.add_samples(rid, event.step, event.prompts, event.answers)
        elif isinstance(event, Rollouts):
            s.add_rollouts(rid, event.step, event.items)
        elif isinstance(event, DistillSpeed):
            s.add_distill_speed(rid, event)  # Store.distill_speed(run_id) reads it back

    # Convenience wrappers -------------------------------------------------------
    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.emit(ev.Progress(stage=stage, done=done, total=total, message=message))

    def log(self, message: str, level: str = "info") -> None:
        log.info(message)
        self.emit(ev.Log(level=level, message=message))
