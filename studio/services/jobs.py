"""Short engine commands run in the background (dataset inspection, model info, devices, export, the preference
store's import and export).

Each :class:`EngineJob` runs ``python -m finetune_studio.engine ...`` with QProcess. Every ``--json`` answer of the
engine is one protocol, the typed JSON-line events of :mod:`core.protocol` (:func:`core.protocol.events.parse_event`):
the job emits ``progress`` for progress events and ``done`` with the last other event (a ``ModelReady``, a
``DatasetReport``, a ``DeviceReport``, a ``PairsImported``, an ``ExportResult``...), or ``failed`` with a message a
person can act on (the one ``Failed`` event every command answers a failure with, or why there was no answer). A
newer request cancels the older one, so only the latest answer shows.
"""

from __future__ import annotations

from typing import cast

from PySide6.QtCore import QEventLoop, QObject, QProcess, QTimer, Signal

from finetune_studio.core.protocol.events import Event, ExportResult, Failed, Progress, ProtocolError, parse_event
from finetune_studio.studio.services.engine_process import PROJECT_ROOT, engine_command, engine_environment

_ORPHANS: set[QProcess] = set()  # cancelled jobs still being reaped


def pending_orphans() -> int:
    return len(_ORPHANS)


def _reaped(proc: QProcess) -> None:
    _ORPHANS.discard(proc)
    try:
        proc.deleteLater()
    except RuntimeError:  # already gone with the application
        pass


def drain_orphans(timeout_ms: int = 3000) -> None:
    """At exit, after the event loop: let killed look-ups finish so none is destroyed while running."""
    if not _ORPHANS:
        return
    loop = QEventLoop()
    for proc in list(_ORPHANS):
        proc.finished.connect(lambda *_: None if _ORPHANS else loop.quit())
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec()


class EngineJob(QObject):
    progress = Signal(object)  # core.protocol.events.Progress
    done = Signal(object)  # a core.protocol.events.Event (never Progress or Failed)
    failed = Signal(str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._proc: QProcess | None = None
        self._generation = 0
        self.command = engine_command  # argv for engine arguments; tests swap in a fake engine
        self.graceful = False  # cancel with SIGTERM (the engine cleans up, e.g. an export's temporary folder)

    @property
    def running(self) -> bool:
        return self._proc is not None

    def run(self, *args: str, argv: list[str] | None = None) -> None:
        """Start ``python -m finetune_studio.engine ARGS`` (or ``argv``), cancelling a job still running."""
        self.cancel()
        self._generation += 1
        gen = self._generation
        argv = argv or self.command(*args)
        proc = QProcess(self)
        proc.setProcessEnvironment(engine_environment())
        proc.setWorkingDirectory(str(PROJECT_ROOT))
        proc.readyReadStandardOutput.connect(lambda: self._read(proc, gen))
        proc.finished.connect(lambda code, status: self._finished(proc, gen, code))
        proc.errorOccurred.connect(lambda err: self._error(proc, gen, err))
        proc.setProperty("out", b"")
        self._proc = proc
        proc.start(argv[0], argv[1:])

    def cancel(self) -> None:
        """Forget the running job and kill it. The process is detached from this object so that it can be
        reaped after the window is gone (a QProcess destroyed while running is an error)."""
        proc, self._proc = self._proc, None
        self._generation += 1
        if proc is None:
            return
        for sig in (proc.readyReadStandardOutput, proc.finished, proc.errorOccurred):
            try:
                sig.disconnect()
            except (RuntimeError, TypeError):
                pass
        if proc.state() == QProcess.ProcessState.NotRunning:
            proc.deleteLater()
            return
        proc.setParent(None)
        _ORPHANS.add(proc)
        proc.finished.connect(lambda *_: _reaped(proc))
        proc.terminate() if self.graceful else proc.kill()

    def _read(self, proc: QProcess, gen: int) -> None:
        buf = bytes(proc.property("out") or b"") + proc.readAllStandardOutput().data()
        *lines, rest = buf.split(b"\n")
        proc.setProperty("out", rest)
        lines_seen = list(proc.property("lines") or [])
        for line in lines:
            if line.strip():
                lines_seen.append(line.decode("utf-8", errors="replace"))
                if gen == self._generation:
                    try:
                        ev = parse_event(line)
                    except ProtocolError:
                        continue
                    if isinstance(ev, Progress):
                        self.progress.emit(ev)
        proc.setProperty("lines", lines_seen)

    def _error(self, proc: QProcess, gen: int, err: QProcess.ProcessError) -> None:
        if err == QProcess.ProcessError.FailedToStart and gen == self._generation:
            self._proc = None
            self.failed.emit(f"The engine could not be started: {proc.errorString()}")
            proc.deleteLater()

    def _finished(self, proc: QProcess, gen: int, code: int) -> None:
        if gen != self._generation:
            proc.deleteLater()
            return
        self._read(proc, gen)
        tail = bytes(proc.property("out") or b"").decode("utf-8", errors="replace").strip()
        lines = list(proc.property("lines") or []) + ([tail] if tail else [])
        err = cast(bytes, proc.readAllStandardError().data()).decode("utf-8", errors="replace").strip()
        proc.deleteLater()
        if gen != self._generation:
            return
        self._proc = None
        result, problem = _result(lines)
        if isinstance(result, Failed):
            self.failed.emit(result.message)
        elif isinstance(result, ExportResult):  # written; a failed check (exit 3) is in its verdict
            self.done.emit(result)
        elif result is None and problem and code == 0:
            self.failed.emit(
                f"The engine's answer was not understood ({problem}); are the app and engine the same version?"
            )
        elif code != 0 or result is None:
            last = err.splitlines()[-1] if err else ""
            self.failed.emit(f"The engine could not answer (exit code {code})" + (f": {last}" if last else "."))
        else:
            self.done.emit(result)


def _result(lines: list[str]) -> tuple[Event | None, str]:
    """(the last event other than progress, '') or (None, why the last line that was no event is not one)."""
    problem = ""
    for line in reversed(lines):
        try:
            ev = parse_event(line)
        except ProtocolError as exc:
            problem = problem or str(exc)
            continue
        if not isinstance(ev, Progress):
            return ev, ""
    return None, problem
