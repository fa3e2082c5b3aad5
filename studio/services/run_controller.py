"""Drives one run at a time: starts or resumes the engine, follows a run in the database, stops it.

Events from our own child (through :class:`EngineProcess`) and rows polled from
the database (a run left training when the app closed, found again on the next
start) feed the same :class:`RunState`, so the train page cannot tell them apart.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal

from finetune_studio.core import paths
from finetune_studio.core.config import TrainConfig
from finetune_studio.core.protocol.events import FailureKind, Started, Step
from finetune_studio.core.protocol.memory_report import MemoryReport
from finetune_studio.core.run_status import RunStatus
from finetune_studio.core.store import RunRecord, Store, signal_process
from finetune_studio.studio.services.engine_process import EngineProcess, Outcome, OutcomeStatus, engine_command
from finetune_studio.studio.state.distill import is_distill
from finetune_studio.studio.state.rollouts import Rollout
from finetune_studio.studio.state.run import EstimateView, MemoryState, RunPhase, RunState
from finetune_studio.studio.state.run_log import LogFile

FOLLOW_MS = 1000


def stopped_on_request(outcome: Outcome, status: str) -> bool:
    """The person pressed Stop and the engine ended by a signal before it could say so (while it was still
    loading, before its own handler for the stop was in place; or killed when it took too long to stop)."""
    return status == "stopping" and outcome.status == "crashed" and (outcome.exit_code or 0) > 128


def stopped_message(outcome: Outcome) -> str:
    if not outcome.run_id:
        return "Stopped before training began; nothing was trained or saved."
    return "Stopped before a checkpoint was saved; a resume starts from the last checkpoint (or from the start)."


def device_bytes(run: RunRecord) -> int:
    """What the device had free when the run's memory estimate was made (0: not recorded)."""
    try:
        return MemoryReport.from_json(run.memory_estimate).device_bytes
    except (ValueError, TypeError, KeyError):
        return 0


def _last_step(steps: np.ndarray) -> int:
    """The last step of a column of steps (-1 when empty): what a read of newer rows starts after."""
    return int(steps[-1]) if len(steps) else -1


def train_args(config_path: str, processes: int = 1) -> list[str]:
    """The engine command for a new run: ``train CONFIG``, with ``--nproc N`` for N processes (one per GPU)."""
    return ["train", config_path, *(["--nproc", str(processes)] if processes > 1 else [])]


class RunController(QObject):
    run_ended = Signal(Outcome)  # how our child, or a followed run, ended
    run_started = Signal(str)  # run id

    def __init__(self, state: RunState, memory: MemoryState, store: Store | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.state, self.memory = state, memory
        self._store = store
        self.proc = EngineProcess(self)
        self.proc.event.connect(self._on_event)
        self.proc.log.connect(self._on_log)
        self.proc.ended.connect(self._on_ended)
        self.follow_timer = QTimer(self, interval=FOLLOW_MS)
        self.follow_timer.timeout.connect(self.poll)
        self.followed_pid = 0
        self.followed_start = ""  # the followed process's start time: a reused pid is never signalled
        self.engine_argv = engine_command  # tests may swap in a fake engine
        self.log_file: LogFile | None = None  # an opened or followed run's engine.log, for the Log tab

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store()
        return self._store

    @property
    def busy(self) -> bool:
        """A run is going on that this app started or follows."""
        return self.proc.running or (self.follow_timer.isActive() and self.state.active)

    # --- starting ------------------------------------------------------------------
    def start(self, config: TrainConfig, processes: int = 1) -> None:
        """Start a new run of ``config``, as ``processes`` processes (``train --nproc N``) when more than one."""
        if self.busy:
            return
        folder = paths.data_dir() / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        paths.atomic_write_text(path, config.to_json())
        self._begin(config.to_dict(), config.display_name)
        on = f", {processes} processes ({config.parallelism.upper()})" if processes > 1 else ""
        self.state.add_log(f"Starting: {config.display_name} (config {path}{on})")
        self.proc.start(self.engine_argv(*train_args(str(path), processes)))

    def resume(self, run_id: str) -> None:
        if self.busy:
            return
        run = self.store.get_run(run_id)
        self._begin(run.config_dict() if run else {}, run.name if run and run.name else run_id)
        if run:
            self._load_run_row(run)
            self._load_history(run_id)
        self.state.set_status(RunPhase.STARTING)
        self.state.add_log(f"Resuming run {run_id}")
        self.proc.start(self.engine_argv("train", "--resume", run_id))

    def _begin(self, config: dict, name: str) -> None:
        self.follow_timer.stop()
        self.state.reset(RunPhase.STARTING)
        self.state.info.config, self.state.info.name = config, name
        self.memory.set_live(0, 0)
        self.state.notify("info")

    # --- stopping ------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run to checkpoint and stop (our child, or a followed run by its pid)."""
        if self.proc.running:
            self.proc.stop()
        elif self.follow_timer.isActive() and self.followed_pid:
            if not signal_process(self.followed_pid, self.followed_start, signal.SIGTERM):
                self.poll()  # the process is gone: show what the database says now
                return
        else:
            return
        self.state.set_status(RunPhase.STOPPING, "Stopping: the engine saves a checkpoint, then exits.")

    def detach(self) -> None:
        """Let our child go on training after the app closes."""
        self.proc.detach()

    # --- events from our child -----------------------------------------------------------
    def _on_event(self, event) -> None:
        if self.state.status == RunPhase.STOPPING and isinstance(event, (Step, Started)):
            self.state.apply(event)
            self.state.status = RunPhase.STOPPING
        else:
            self.state.apply(event)
        if isinstance(event, Step):
            self.memory.set_live(event.memory_used_bytes, event.memory_peak_bytes)
        elif isinstance(event, Started):
            self._budget(event.memory_budget_bytes, event.memory_total_bytes, event.device)
            self.run_started.emit(event.run_id)

    def _on_log(self, level: str, text: str) -> None:
        self.state.add_log(text if level in ("stderr", "info") else f"[{level}] {text}")

    def _on_ended(self, outcome: Outcome) -> None:
        outcome = self._reconciled(outcome)
        st = self.state
        if stopped_on_request(outcome, st.status):
            st.set_status("stopped", stopped_message(outcome))
            self.run_ended.emit(outcome)
            return
        if outcome.status == OutcomeStatus.DETACHED:
            st.set_status(RunPhase.RUNNING, "The run goes on in the background; reopen the app to follow it.")
        elif outcome.status in (OutcomeStatus.COMPLETED, OutcomeStatus.STOPPED):
            if st.status not in (RunPhase.COMPLETED, RunPhase.STOPPED):
                st.set_status(
                    RunPhase(outcome.status.value),
                    "Training complete."
                    if outcome.status == OutcomeStatus.COMPLETED
                    else "Stopped; the run can be resumed from its last checkpoint.",
                )
        else:  # failed, crashed, not started
            st.set_status(RunPhase.FAILED, outcome.message, outcome.kind or FailureKind.ERROR)
        if outcome.message and not outcome.ok:
            st.add_log(outcome.message)
        self.run_ended.emit(outcome)

    def _reconciled(self, outcome: Outcome) -> Outcome:
        """The database is written before the ``finished`` event: a child killed in between has ended its run
        (the database says so) without saying it on stdout. Believe the database then."""
        if outcome.status != OutcomeStatus.CRASHED or not outcome.run_id:
            return outcome
        try:
            run = self.store.get_run(outcome.run_id)
        except Exception:  # a damaged database: keep the crash report
            return outcome
        if run and run.status in (RunStatus.COMPLETED, RunStatus.STOPPED):
            return Outcome(OutcomeStatus(run.status.value), "", None, outcome.exit_code, outcome.run_id)
        return outcome

    def _budget(self, budget: int, total: int, device: str) -> None:
        est = self.memory.estimate
        if budget or total:
            self.memory.set_estimate(
                EstimateView(
                    budget or est.total_bytes, est.parts, device or est.device_name, total or est.device_total_bytes, ""
                )
            )

    # --- past and followed runs ------------------------------------------------------------
    def open_run(self, run_id: str) -> bool:
        """Show a run from the database; follow it if it is still training. False if busy or unknown."""
        if self.busy:
            return False
        run = self.store.get_run(run_id)
        if run is None:
            return False
        self._begin(run.config_dict(), run.name or run_id)
        self._load_run_row(run)
        self._load_history(run_id)
        self.log_file = LogFile.of_run(run.run_dir)
        self._read_log()
        if run.status == RunStatus.RUNNING:
            self.followed_pid = run.pid or 0
            self.followed_start = run.pid_start
            self.state.following = True
            self.state.set_status(RunPhase.RUNNING, "Following a run that trains in the background.")
            self.follow_timer.start()
        else:
            self._final_status(run)
        return True

    def _read_log(self) -> None:
        """The new lines of the opened or followed run's engine.log into the Log tab."""
        for line in self.log_file.read_new() if self.log_file is not None else []:
            self.state.add_log(line)

    def _load_run_row(self, run: RunRecord) -> None:
        info = self.state.info
        info.run_id, info.run_dir = run.id, run.run_dir
        info.total_steps = run.total_steps
        info.device = run.device
        self.state.memory_budget_bytes = run.memory_budget_bytes
        # the device's memory as the run's estimate saw it (free then): the bar is scaled to the device, not to the
        # budget (the row keeps no total)
        self._budget(self.state.memory_budget_bytes, device_bytes(run), info.device)
        self.state.notify("info")
        if run.best_step is not None:
            self.state.set_best(run.best_step, run.best_eval_loss, run.best_checkpoint)

    def _load_history(self, run_id: str) -> None:
        by_step: dict[int, list[tuple[str, str]]] = {}
        for sample in self.store.samples(run_id):
            by_step.setdefault(sample.step, []).append((sample.prompt, sample.answer))
        for step, pairs in by_step.items():
            if self.state.samples.get(step) != pairs:
                self.state.add_samples(step, pairs)
        train = self.store.metrics(run_id, "train", since_step=self.state.step if self.state.train.n else -1)
        evals = self.store.metrics(run_id, "eval", since_step=int(self.state.eval.last("step") or -1))
        named = self.store.named_metrics(run_id, "train", since_step=_last_step(self.state.figures.steps()))
        named_evals = self.store.named_metrics(run_id, "eval", since_step=_last_step(self.state.eval_figures.steps()))
        self._load_rollouts(run_id)
        if train or evals or named or named_evals:
            self.state.load_history(train, evals, named, named_evals)
            last = self.state.train
            if last.n:
                self.memory.set_live(int(last.last("memory_used_bytes") or 0), int(last.last("memory_peak_bytes") or 0))

    def _load_rollouts(self, run_id: str) -> None:
        """The run's rollouts the page has not shown yet (an online RL run keeps every one in the database)."""
        read = getattr(self.store, "rollouts", None)  # Store.rollouts(run_id, since_step)
        if read is None:
            return
        rows = read(run_id, since_step=self.state.rollouts.last_step)
        places: dict[int, int] = {}  # a row's place among its step's rows, in the order they were stored
        rollouts = []
        for row in rows:
            step = int(row["step"] if isinstance(row, dict) else row.step)
            places[step] = places.get(step, -1) + 1
            rollouts.append(Rollout.of(step, places[step], row))
        self.state.rollouts.extend(rollouts)

    def poll(self) -> None:
        """One cheap incremental read: new metric rows since the last step, and the run's status."""
        run_id = self.state.info.run_id
        run = self.store.get_run(run_id) if run_id else None
        if run is None:
            self.follow_timer.stop()
            return
        self._load_history(run_id)
        self._read_log()
        if run.total_steps:
            self.state.info.total_steps = run.total_steps
        if run.status != RunStatus.RUNNING:
            self.follow_timer.stop()
            self.state.following = False
            self._final_status(run)
            ended = OutcomeStatus.of_run(run.status)
            why = (run.error or "The run failed.") if ended == OutcomeStatus.FAILED else ""
            kind = FailureKind.parse(run.error_kind) if ended == OutcomeStatus.FAILED else None
            self.run_ended.emit(Outcome(ended, why, kind, run_id=run_id))

    def _load_distill_speed(self, run_id: str) -> None:
        """A distillation run's generation speed beside its teacher, once the run has ended (measured at its end)."""
        if is_distill(self.state.info.config):
            self.state.set_distill_speed(self.store.distill_speed(run_id))

    def _final_status(self, run: RunRecord) -> None:
        self._load_distill_speed(run.id)
        status = run.status
        step = run.step or self.state.step
        self.state.step = max(self.state.step, step)
        messages = {
            RunStatus.COMPLETED: "Training complete.",
            RunStatus.STOPPED: f"Stopped at step {step}; it can be resumed.",
            RunStatus.INTERRUPTED: "This run was interrupted (its process is gone); it can be resumed from its last "
            "checkpoint.",
            RunStatus.CREATED: "This run never started.",
        }
        if status == RunStatus.FAILED:
            self.state.set_status(RunPhase.FAILED, run.error or "The run failed.", FailureKind.parse(run.error_kind))
        else:
            self.state.set_status(RunPhase.of(status), messages.get(status, ""))

    def find_live_run(self) -> str | None:
        """A run still training from an earlier session of the app (status running, process alive)."""
        for run in self.store.list_runs(status=RunStatus.RUNNING):
            if run.status == RunStatus.RUNNING:  # its process is alive (else the store says interrupted)
                return run.id
        return None
