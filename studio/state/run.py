"""What the app shows about one training run, independent of Qt.

:class:`RunState` is fed typed events (from the live engine or from the
database when following or reopening a run) and keeps the curves in growable
numpy columns. Widgets subscribe and redraw; tests drive it directly.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from finetune_studio.core.protocol.distill_report import DistillSpeed
from finetune_studio.core.protocol.events import (
    CheckpointSaved,
    Eval,
    Failed,
    FailureKind,
    Finished,
    Progress,
    Sample,
    Started,
    Step,
)
from finetune_studio.core.run_status import RunStatus
from finetune_studio.core.store import MetricRow
from finetune_studio.studio.state.observable import Observable
from finetune_studio.studio.state.rl_figures import StepFigures
from finetune_studio.studio.state.rollouts import Rollouts
from finetune_studio.studio.state.series import Columns, Ema

TRAIN_COLUMNS = (
    "step",
    "loss",
    "loss_smooth",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "memory_used_bytes",
    "memory_peak_bytes",
    "elapsed_s",
    "reward_margin",
    "reward_accuracy",
)
EVAL_COLUMNS = ("step", "eval_loss", "reward_margin", "reward_accuracy")
LOG_LINES = 5000


class RunPhase(StrEnum):
    """What the app shows a run as: a stored :class:`core.run_status.RunStatus` (the same strings), or one of the
    app's own states around it (nothing yet, starting, stopping)."""

    IDLE = "idle"  # no run
    STARTING = "starting"  # the engine is setting up (model, data); no step yet
    RUNNING = RunStatus.RUNNING.value
    STOPPING = "stopping"  # asked to stop: the engine saves a checkpoint, then exits
    CREATED = RunStatus.CREATED.value
    COMPLETED = RunStatus.COMPLETED.value
    STOPPED = RunStatus.STOPPED.value
    FAILED = RunStatus.FAILED.value
    INTERRUPTED = RunStatus.INTERRUPTED.value

    @classmethod
    def of(cls, status: str | RunStatus) -> RunPhase:
        """The phase of a stored run status (a status the app does not know reads as interrupted)."""
        try:
            return cls(status)
        except ValueError:
            return cls.INTERRUPTED


ACTIVE = frozenset({RunPhase.STARTING, RunPhase.RUNNING, RunPhase.STOPPING})  # a process is (about to be) training


@dataclass
class RunInfo:
    run_id: str = ""
    name: str = ""
    run_dir: str = ""
    device: str = ""
    total_steps: int = 0
    resumed_from_step: int = 0
    trainable_params: int = 0
    config: dict = field(default_factory=dict)


class RunState(Observable):
    """One run's live picture. Topics: 'status', 'metrics', 'log', 'progress', 'info', 'samples' (what the model
    answers to the fixed validation prompts at each evaluation, and the best evaluation under early stopping),
    'distill_speed' (a distillation's student timed beside its teacher at the run's end)."""

    def __init__(self) -> None:
        super().__init__()
        self.train = Columns(TRAIN_COLUMNS)
        self.eval = Columns(EVAL_COLUMNS)
        self.figures = StepFigures()  # an objective's own figures at each step (Step.metrics: GRPO's reward, kl...)
        self.eval_figures = StepFigures()  # ... and at each evaluation (Eval.metrics: a reward model's accuracy)
        self.rollouts = Rollouts()  # an online RL run's sampled answers with their rewards
        self._ema = Ema(0.9)
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.reset()

    def reset(self, status: RunPhase = RunPhase.IDLE) -> None:
        self.info = RunInfo()
        self.status = status
        self.message = ""  # what a person should know (failure reason, how it ended)
        self.message_kind: FailureKind | None = None  # with a failure: what kind of problem
        self.step = 0
        self.elapsed_s = 0.0
        self.memory_budget_bytes = 0
        self.memory_total_bytes = 0
        self.progress: Progress | None = None  # slow set-up work before the first step
        self.last_checkpoint = ""
        self.following = False  # fed from the database, not from our own child process
        self.samples: dict[int, list[tuple[str, str]]] = {}  # step -> (prompt, answer) at that evaluation
        self.best_step: int | None = None  # early stopping: the best evaluation so far
        self.best_eval_loss: float | None = None
        self.best_checkpoint = ""
        self.distill_speed: DistillSpeed | None = None  # a distillation run's generation speed, at its end
        self.train.clear()
        self.eval.clear()
        self.figures.clear()
        self.eval_figures.clear()
        self.rollouts.clear()
        self._ema.reset()
        self.log.clear()
        self._rate_marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=50)
        self._session_elapsed = 0.0  # the engine's elapsed_s in the current session (it starts at 0 on a resume)
        self._earlier_sessions_s = 0.0  # training time of the sessions before a resume
        for topic in ("status", "metrics", "log", "progress", "info", "samples", "distill_speed"):
            self.notify(topic)

    # --- derived ------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def fraction(self) -> float:
        total = self.info.total_steps
        return min(1.0, self.step / total) if total else 0.0

    def eta_s(self) -> float | None:
        """Seconds left, from the recent step rate (the last 50 steps)."""
        if len(self._rate_marks) < 2 or not self.info.total_steps:
            return None
        (s0, t0), (s1, t1) = self._rate_marks[0], self._rate_marks[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0.0, (self.info.total_steps - s1) * (t1 - t0) / (s1 - s0))

    # --- feeding ------------------------------------------------------------
    def set_status(self, status: RunPhase | str, message: str = "", kind: FailureKind | None = None) -> None:
        self.status = RunPhase(status)
        if message or kind:
            self.message, self.message_kind = message, kind
        self.notify("status")

    def add_log(self, line: str) -> None:
        self.log.append(line.rstrip("\n"))
        self.notify("log")

    def apply(self, event) -> None:
        """Fold one engine event into the picture."""
        if isinstance(event, Step):
            self._add_step(event.__dict__)
            if event.metrics:
                self.figures.add(event.step, event.metrics)
            self.notify("metrics")
        elif isinstance(event, Eval):
            self.eval.append(
                step=event.step,
                eval_loss=event.eval_loss,
                reward_margin=event.reward_margin,
                reward_accuracy=event.reward_accuracy,
            )
            if event.metrics:
                self.eval_figures.add(event.step, event.metrics)
            self.notify("metrics")
            if event.best_step is not None:
                self.best_step, self.best_eval_loss = event.best_step, event.best_eval_loss
                self.notify("samples")
        elif isinstance(event, Sample):
            self.add_samples(event.step, list(zip(event.prompts, event.answers, strict=False)))
        elif isinstance(event, Started):
            self.info.run_id, self.info.run_dir, self.info.device = event.run_id, event.run_dir, event.device
            self.info.total_steps, self.info.resumed_from_step = event.total_steps, event.resumed_from_step
            self.info.trainable_params = event.trainable_params
            self.memory_budget_bytes = event.memory_budget_bytes or self.memory_budget_bytes
            self.memory_total_bytes = event.memory_total_bytes or self.memory_total_bytes
            self.step = max(self.step, event.resumed_from_step)
            for columns in (self.train, self.eval):
                columns.truncate_after("step", event.resumed_from_step)
            self.figures.truncate_after(event.resumed_from_step)
            self.eval_figures.truncate_after(event.resumed_from_step)
            self.rollouts.truncate_after(event.resumed_from_step)
            self.progress = None
            self.notify("info")
            self.set_status(RunPhase.RUNNING)
        elif isinstance(event, Progress):
            self.progress = event
            self.notify("progress")
        elif isinstance(event, CheckpointSaved):
            self.last_checkpoint = event.path
            self.add_log(f"Checkpoint saved at step {event.step}: {event.path}")
        elif isinstance(event, Finished):
            self.step = max(self.step, event.step)
            if event.best_checkpoint:
                self.best_checkpoint = event.best_checkpoint
                self.best_step = event.best_step if event.best_step is not None else self.best_step
                self.notify("samples")
            how = (
                "Training complete."
                if event.status == RunStatus.COMPLETED
                else (f"Stopped at step {event.step}; a checkpoint was saved and the run can be resumed.")
            )
            self.set_status(RunPhase.of(event.status), how)
        elif isinstance(event, Failed):
            self.set_status(RunPhase.FAILED, event.message, event.kind)
        elif getattr(event, "type", "") == "rollouts":  # core.protocol.rollouts.Rollouts: step, items
            self.rollouts.add(int(event.step), list(event.items))
        elif isinstance(event, DistillSpeed):
            self.set_distill_speed(event)

    def set_distill_speed(self, speed: DistillSpeed | None) -> None:
        """A distillation run's student timed beside its teacher (live, or read back with the run)."""
        if speed != self.distill_speed:
            self.distill_speed = speed
            self.notify("distill_speed")

    def add_samples(self, step: int, pairs: list[tuple[str, str]]) -> None:
        self.samples[int(step)] = pairs
        self.notify("samples")

    def set_best(self, step: int | None, eval_loss: float | None, checkpoint: str = "") -> None:
        self.best_step, self.best_eval_loss = step, eval_loss
        self.best_checkpoint = checkpoint or self.best_checkpoint
        self.notify("samples")

    def _add_step(self, row: dict) -> None:
        step = int(row["step"])
        if self.train.n and step <= cast(float, self.train.last("step")):
            self._truncate_after(step - 1)  # a resume re-trains these steps
        smooth = self._ema.update(row.get("loss"))
        elapsed = self._total_elapsed(row.get("elapsed_s"))
        row = dict(row, elapsed_s=elapsed)
        self.train.append(**{k: row.get(k) for k in TRAIN_COLUMNS if k != "loss_smooth"}, loss_smooth=smooth)
        self.step = step
        if row.get("total_steps"):
            self.info.total_steps = int(row["total_steps"])
        self.elapsed_s = elapsed if elapsed is not None else self.elapsed_s
        self._rate_marks.append((step, self.elapsed_s if elapsed is not None else time.monotonic()))

    def _total_elapsed(self, elapsed) -> float | None:
        """The run's training time at a step whose ``elapsed_s`` the engine counts from the start of its session: a
        resumed run starts again at 0, so the earlier sessions' time is added and the time goes on across a resume.
        None when the step has no time."""
        if not elapsed:
            return None
        elapsed = float(elapsed)
        if elapsed < self._session_elapsed:  # a new session (a resume)
            self._earlier_sessions_s += self._session_elapsed
        self._session_elapsed = elapsed
        return self._earlier_sessions_s + elapsed

    def _truncate_after(self, step: int) -> None:
        """Drop the steps after ``step`` and rewind the smoothing to the kept ones, so that the re-trained steps
        are smoothed exactly as in an uninterrupted run (no jump at the resume point)."""
        self.train.truncate_after("step", step)
        self.figures.truncate_after(step)
        self._ema.reset()
        for loss in self.train.column("loss"):
            self._ema.update(float(loss))

    def load_history(
        self,
        train: Sequence[MetricRow | Figures],
        evals: Sequence[MetricRow | Figures],
        named: Mapping[int, Figures] | None = None,
        named_evals: Mapping[int, Figures] | None = None,
    ) -> None:
        """Metrics rows from the database (a past or followed run), appended in bulk (rows given as their figures by
        column name are read alike); ``named``, ``named_evals``: an objective's own figures by step
        (``Store.named_metrics``)."""
        train_rows, eval_rows = _figures(train), _figures(evals)
        if train_rows and self.train.n and train_rows[0]["step"] <= self.train.last("step"):
            self._truncate_after(int(train_rows[0]["step"]) - 1)
        if train_rows:
            smooth = [self._ema.update(r.get("loss")) for r in train_rows]
            train_rows = [dict(r, elapsed_s=self._total_elapsed(r.get("elapsed_s"))) for r in train_rows]
            self.train.extend([dict(r, loss_smooth=v) for r, v in zip(train_rows, smooth)])
            last = train_rows[-1]
            self.step = int(last["step"])
            if last.get("elapsed_s"):
                self.elapsed_s = float(last["elapsed_s"])
            for r in train_rows[-50:]:
                self._rate_marks.append((int(r["step"]), float(r.get("elapsed_s") or r.get("time") or 0.0)))
        if eval_rows:
            self.eval.extend([dict(r) for r in eval_rows])
        if named:
            self.figures.extend(named)
        if named_evals:
            self.eval_figures.extend(named_evals)
        self.notify("metrics")


Figures = Mapping[str, Any]  # a step's figures by column name (TRAIN_COLUMNS, EVAL_COLUMNS)


def _figures(rows: Sequence[MetricRow | Figures]) -> list[Figures]:
    return [r.figures() if isinstance(r, MetricRow) else r for r in rows]


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_bytes(n: float | None) -> str:
    if not n:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@dataclass(frozen=True)
class EstimateView:
    """The memory budget as the memory panel shows it: ``core.memory.estimate``'s estimate (or the engine's own
    figure once a run starts) against the device, in labelled parts, or why there is none."""

    total_bytes: int = 0
    parts: dict = field(default_factory=dict)  # label -> bytes
    device_name: str = ""
    device_total_bytes: int = 0
    note: str = ""  # the verdict ("Needs ~1.2 GiB of 16 GiB — fits"), why there is no estimate, or a warning
    fits: bool = True
    lengths: str = ""  # the batch the estimate assumes: fitted to the data, or the worst case


class MemoryState(Observable):
    """Budget (the estimate before the run) against the device and, during a run, what is in use."""

    def __init__(self) -> None:
        super().__init__()
        self.estimate = EstimateView()
        self.used_bytes = 0
        self.peak_bytes = 0

    def set_estimate(self, estimate: EstimateView) -> None:
        self.estimate = estimate
        self.notify("estimate")

    def set_live(self, used: int, peak: int) -> None:
        self.used_bytes, self.peak_bytes = int(used or 0), int(peak or 0)
        self.notify("live")
