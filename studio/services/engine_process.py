"""The one QObject that runs an engine child process and speaks its JSON-line protocol.

It starts ``python -m finetune_studio.studio.services.relay <command>`` with QProcess (the relay lets a
run outlive the app when asked), turns stdout lines into typed events from
:mod:`core.protocol.events`, forwards stderr as log lines, and keeps a typed
:class:`Outcome` once the child is gone. Nothing here blocks: no ``waitFor*``.
"""

from __future__ import annotations

import collections
import os
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

from finetune_studio.core.paths import python_argv
from finetune_studio.core.protocol.events import (
    Event,
    Failed,
    FailureKind,
    Finished,
    ProtocolError,
    Started,
    parse_event,
)
from finetune_studio.core.run_status import RunStatus, parse_status
from finetune_studio.studio.services import relay

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def engine_command(*args: str) -> list[str]:
    """argv for ``python -m finetune_studio.engine ARGS`` in this interpreter."""
    return [*python_argv(), "-m", "finetune_studio.engine", *args]


def engine_environment() -> QProcessEnvironment:
    """The app's environment with unbuffered output."""
    env = QProcessEnvironment.systemEnvironment()
    env.insert("PYTHONUNBUFFERED", "1")
    return env


class OutcomeStatus(StrEnum):
    """How a run's process ended, as the app saw it."""

    COMPLETED = "completed"  # trained to the end (the engine said so)
    STOPPED = "stopped"  # stopped on request after a checkpoint
    FAILED = "failed"  # the engine said why (a ``failed`` event)
    CRASHED = "crashed"  # it ended without saying how the run ended (a signal, a crash)
    NOT_STARTED = "not_started"  # the engine could not be started
    DETACHED = "detached"  # it goes on without the app
    INTERRUPTED = "interrupted"  # a followed run's process vanished (the database says so)

    @classmethod
    def of_run(cls, status: str | RunStatus | None) -> OutcomeStatus:
        """The outcome of a followed run whose stored status is ``status`` (no longer running)."""
        run_status = parse_status(status)
        if run_status in (RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED):
            return cls(run_status.value)
        return cls.INTERRUPTED


@dataclass(frozen=True)
class Outcome:
    """How a run ended: a child of ours, or a run the app followed in the database."""

    status: OutcomeStatus
    message: str = ""
    kind: FailureKind | None = None  # for failed and crashed: what kind of problem (the engine's, or ERROR)
    exit_code: int | None = None
    run_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", OutcomeStatus(self.status))
        object.__setattr__(self, "kind", FailureKind.parse(self.kind) if self.kind else None)

    @property
    def ok(self) -> bool:
        return self.status in (OutcomeStatus.COMPLETED, OutcomeStatus.STOPPED, OutcomeStatus.DETACHED)


class EngineProcess(QObject):
    """Runs one child; emits ``event`` for every event (and typed shortcuts), ``log`` for text, ``ended``."""

    event = Signal(object)  # type: ignore[assignment]  # any core.protocol.events.Event
    started_run = Signal(object)  # Started
    log = Signal(str, str)  # level ("stderr", "info", "warning", ...), text
    protocol_error = Signal(str)
    ended = Signal(Outcome)

    def __init__(self, parent: QObject | None = None, *, stderr_tail: int = 40):
        super().__init__(parent)
        self._proc: QProcess | None = None
        self._out = bytearray()
        self._err = bytearray()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_tail)
        self._reset()

    def _reset(self) -> None:
        self.outcome: Outcome | None = None
        self.run_id = ""
        self.events_seen = 0
        self.protocol_errors = 0
        self._terminal: Event | None = None
        self._stop_requested = False
        self._detach_requested = False
        self._out.clear()
        self._err.clear()
        self._stderr_tail.clear()

    # --- control ------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    def start(self, argv: list[str], *, cwd: str | Path | None = None) -> None:
        if self.running:
            raise RuntimeError("a child process is already running")
        self._reset()
        proc = QProcess(self)
        proc.setProcessEnvironment(engine_environment())
        proc.setWorkingDirectory(str(cwd or PROJECT_ROOT))
        proc.readyReadStandardOutput.connect(self._on_stdout)
        proc.readyReadStandardError.connect(self._on_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self._proc = proc
        relay_argv = [*python_argv(), "-m", "finetune_studio.studio.services.relay", *argv]
        proc.start(relay_argv[0], relay_argv[1:])

    def stop(self, grace_ms: int = 180_000) -> None:
        """Ask the child to stop (SIGTERM: the engine checkpoints and exits); kill it after ``grace_ms``."""
        if not self.running:
            return
        self._stop_requested = True
        assert self._proc is not None
        self._proc.terminate()
        proc = self._proc
        QTimer.singleShot(grace_ms, self, lambda: self.kill() if proc is self._proc and self.running else None)

    def detach(self) -> None:
        """Let the child go on without us: the relay exits and the child keeps running."""
        if not self.running:
            return
        self._detach_requested = True
        assert self._proc is not None
        self._proc.closeWriteChannel()

    def kill(self) -> None:
        """End the child at once (the relay turns SIGUSR1 into SIGKILL for it), then the relay."""
        if not self.running:
            return
        self._stop_requested = True
        assert self._proc is not None
        pid = self._proc.processId()
        if pid > 0:
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
        proc = self._proc
        QTimer.singleShot(2000, self, lambda: proc.kill() if proc is self._proc and self.running else None)

    # --- reading --------------------------------------------------------------
    def _on_stdout(self) -> None:
        assert self._proc is not None
        self._out += self._proc.readAllStandardOutput().data()
        while (i := self._out.find(b"\n")) >= 0:
            line = bytes(self._out[:i]).strip()
            del self._out[: i + 1]
            if line:
                self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        try:
            event = parse_event(line)
        except ProtocolError as exc:
            self.protocol_errors += 1
            msg = f"Ignored a line the app could not read from the engine: {exc}"
            self.log.emit("warning", msg)
            self.protocol_error.emit(str(exc))
            return
        self.events_seen += 1
        if isinstance(event, Started):
            self.run_id = event.run_id
            self.started_run.emit(event)
        elif isinstance(event, (Finished, Failed)):
            self._terminal = event
            self.run_id = getattr(event, "run_id", "") or self.run_id
        self.event.emit(event)

    def _on_stderr(self) -> None:
        assert self._proc is not None
        self._err += self._proc.readAllStandardError().data()
        while (i := self._err.find(b"\n")) >= 0:
            text = bytes(self._err[:i]).decode("utf-8", errors="replace").rstrip()
            del self._err[: i + 1]
            if text:
                self._stderr_tail.append(text)
                self.log.emit("stderr", text)

    # --- ending -----------------------------------------------------------------
    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            assert self._proc is not None
            why = f"The engine could not be started: {self._proc.errorString()}"
            self._finish(Outcome(OutcomeStatus.NOT_STARTED, why))

    def _on_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._on_stdout()
        if self._out.strip():
            self._handle_line(bytes(self._out).strip())
            self._out.clear()
        if self._err.strip():
            self._err += b"\n"
            self._on_stderr()
        self._finish(self._judge(exit_code, exit_status))

    def _judge(self, code: int, status: QProcess.ExitStatus) -> Outcome:
        term = self._terminal
        if self._detach_requested and term is None:
            return Outcome(
                OutcomeStatus.DETACHED, "The run goes on in the background.", exit_code=code, run_id=self.run_id
            )
        if isinstance(term, Failed):
            return Outcome(OutcomeStatus.FAILED, term.message, term.kind, code, self.run_id)
        if isinstance(term, Finished):
            return Outcome(OutcomeStatus(term.status.value), "", None, code, self.run_id)
        tail = "\n".join(list(self._stderr_tail)[-8:])
        if code == relay.NOT_STARTED and self.events_seen == 0:
            why = "The engine could not be started." + (f"\n{tail}" if tail else "")
            return Outcome(OutcomeStatus.NOT_STARTED, why, exit_code=code)
        if status == QProcess.ExitStatus.CrashExit or code > 128:
            sig = code - 128 if code > 128 else None
            why = " (killed; often the system ran out of memory)" if sig == 9 and not self._stop_requested else ""
            msg = f"The engine was ended by signal {sig}{why}." if sig else "The engine crashed."
        elif self._stop_requested and code == 0:
            return Outcome(OutcomeStatus.STOPPED, "", None, code, self.run_id)
        elif self.events_seen == 0:
            msg = f"The engine exited (code {code}) before it reported anything."
        else:
            msg = f"The engine exited unexpectedly (code {code}) without saying how the run ended."
        if tail:
            msg += f"\nLast output:\n{tail}"
        return Outcome(OutcomeStatus.CRASHED, msg, FailureKind.ERROR, code, self.run_id)

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.deleteLater()
        self.ended.emit(outcome)
