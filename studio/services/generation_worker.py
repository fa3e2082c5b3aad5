"""The one QObject that runs the generation worker (``python -m finetune_studio.engine serve``).

Requests of :mod:`core.protocol.generation` go out as JSON lines on the worker's stdin; its replies come back parsed
into
their typed classes and are emitted as ``reply`` (every reply, on the UI thread, through Qt's event loop). Nothing
here blocks: no ``waitFor*``. A request sent while no worker runs starts one; requests wait until its ``ready``.

The wrapper remembers what the worker holds (the model, the adapters attached under their names) so that
:meth:`prepare` sends only the loads that are missing. When the worker dies (killed, crashed, out of memory) that
memory is dropped, ``died`` says so at once with the last lines of its stderr, and the next request starts a new
worker with nothing loaded.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

from PySide6.QtCore import QObject, QProcess, Signal

from finetune_studio.core.protocol import generation as gp
from finetune_studio.core.protocol.generation_client import worker_argv
from finetune_studio.studio.services.engine_process import PROJECT_ROOT, engine_environment
from finetune_studio.studio.state.generation_weights import default_weights


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to attach: a run id (its final adapter), with ``checkpoint`` one of its steps, or a folder."""

    source: str
    checkpoint: int | None = None


class GenerationWorker(QObject):
    reply = Signal(object)  # a core.protocol.generation Reply (Ready, Loaded, Delta, Done, Generated, Error, ...)
    ready = Signal(object)  # Ready
    died = Signal(str)  # why, for a person
    log = Signal(str)  # a stderr line

    def __init__(self, parent: QObject | None = None, *, threads: int = 0):
        super().__init__(parent)
        self.argv = worker_argv(threads)
        self._proc: QProcess | None = None
        self._out = bytearray()
        self._err = bytearray()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=12)
        self._queue: list[gp.Request] = []
        self._ready = False
        self._closing = False
        self._ids = itertools.count(1)
        self.pid = 0
        self.pending: set[str] = set()  # ids sent (or queued) without their final reply yet
        self.model: str | None = None  # the model spec the worker holds
        self.weights: gp.Weights = "full"  # the LoadModel.weights it was loaded with
        self.adapters: dict[str, AdapterSpec] = {}

    # --- state ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def new_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    # --- requests -------------------------------------------------------------------
    def send(self, request: gp.Request) -> str:
        """Queue ``request`` (starting a worker when none runs); returns its id."""
        self.pending.add(request.id)
        if not self.running:
            self._start()
        if self._ready:
            self._write(request)
        else:
            self._queue.append(request)
        return request.id

    def prepare(self, model: str, adapters: dict[str, AdapterSpec], weights: gp.Weights | None = None) -> list[str]:
        """Send the load and attach requests the worker still needs for ``model`` with ``adapters`` (by name).

        ``weights``: ``LoadModel.weights`` (``full`` / ``int8`` / ``int4``); None keeps those the worker holds for
        ``model`` (a model not loaded yet: :func:`studio.state.generation_weights.default_weights`)."""
        if weights is None:
            weights = self.weights if self.model == model else default_weights(model)
        sent = []
        if self.model != model or self.weights != weights:
            sent.append(self.send(gp.LoadModel(id=self.new_id("load"), model=model, weights=weights)))
            self.model, self.weights, self.adapters = model, weights, {}
        for name, spec in adapters.items():
            if self.adapters.get(name) != spec:
                sent.append(
                    self.send(
                        gp.AttachAdapter(
                            id=self.new_id("attach"), name=name, source=spec.source, checkpoint=spec.checkpoint
                        )
                    )
                )
                self.adapters[name] = spec
        return sent

    def cancel(self, target: str) -> None:
        if self.running and target in self.pending:
            self._write(gp.Cancel(id=self.new_id("cancel"), target=target))

    def kill(self) -> None:
        """End the worker at once (``died`` follows)."""
        if self.running:
            assert self._proc is not None
            self._proc.kill()

    def shutdown(self) -> None:
        """Close the worker's stdin (it cancels what runs and exits) and kill it if it lingers."""
        self._closing = True
        self._queue.clear()
        if self.running:
            assert self._proc is not None
            self._proc.closeWriteChannel()
            proc = self._proc
            from PySide6.QtCore import QTimer

            QTimer.singleShot(3000, self, lambda: proc.kill() if proc is self._proc and self.running else None)

    def drain(self, timeout_ms: int = 5000) -> None:
        """At exit, after the event loop: let the worker finish exiting so that it is not destroyed running."""
        if not self.running:
            return
        from PySide6.QtCore import QEventLoop, QTimer

        loop = QEventLoop()
        assert self._proc is not None
        self._proc.finished.connect(loop.quit)
        QTimer.singleShot(timeout_ms, loop.quit)
        loop.exec()
        if self.running:
            self._proc.kill()

    # --- process --------------------------------------------------------------------
    def _start(self) -> None:
        self._closing = False
        self._ready = False
        self._out.clear()
        self._err.clear()
        self._stderr_tail.clear()
        proc = QProcess(self)
        proc.setProcessEnvironment(engine_environment())
        proc.setWorkingDirectory(str(PROJECT_ROOT))
        proc.readyReadStandardOutput.connect(lambda: self._on_stdout(proc))
        proc.readyReadStandardError.connect(lambda: self._on_stderr(proc))
        proc.finished.connect(lambda code, status: self._on_finished(proc, code, status))
        proc.errorOccurred.connect(lambda err: self._on_error(proc, err))
        self._proc = proc
        proc.start(self.argv[0], self.argv[1:])

    def _write(self, request: gp.Request) -> None:
        assert self._proc is not None
        self._proc.write((request.to_json() + "\n").encode("utf-8"))

    def _on_stdout(self, proc: QProcess) -> None:
        if proc is not self._proc:
            return
        self._out += proc.readAllStandardOutput().data()
        while (i := self._out.find(b"\n")) >= 0:
            line = bytes(self._out[:i]).strip()
            del self._out[: i + 1]
            if line:
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        try:
            reply = gp.parse_reply(line)
        except gp.ProtocolError as exc:
            self.log.emit(f"Ignored a line the app could not read from the generation worker: {exc}")
            return
        if isinstance(reply, gp.Ready):
            self._ready = True
            self.pid = reply.pid
            queued, self._queue = self._queue, []
            for request in queued:
                self._write(request)
            self.ready.emit(reply)
        if gp.is_final(reply):
            self.pending.discard(reply.id)
            if isinstance(reply, gp.Error):
                self._forget_failed(reply.id)
        self.reply.emit(reply)

    def _forget_failed(self, request_id: str) -> None:
        """A failed load or attach leaves the worker without it: ask again next time."""
        if request_id.startswith("load"):
            self.model, self.adapters = None, {}
        elif request_id.startswith("attach"):
            self.adapters = {}

    def _on_stderr(self, proc: QProcess) -> None:
        if proc is not self._proc:
            return
        self._err += proc.readAllStandardError().data()
        while (i := self._err.find(b"\n")) >= 0:
            text = bytes(self._err[:i]).decode("utf-8", errors="replace").rstrip()
            del self._err[: i + 1]
            if text:
                self._stderr_tail.append(text)
                self.log.emit(text)

    def _on_error(self, proc: QProcess, error: QProcess.ProcessError) -> None:
        if proc is self._proc and error == QProcess.ProcessError.FailedToStart:
            self._gone(proc, f"The generation worker could not be started: {proc.errorString()}")

    def _on_finished(self, proc: QProcess, code: int, status: QProcess.ExitStatus) -> None:
        if proc is not self._proc:
            proc.deleteLater()
            return
        self._on_stdout(proc)
        if self._closing:  # we asked it to go: not news
            self._gone(proc, "")
            return
        if status == QProcess.ExitStatus.CrashExit or code != 0:
            why = "was killed or crashed" if status == QProcess.ExitStatus.CrashExit else f"exited with code {code}"
        else:
            why = "exited"
        tail = "\n".join(list(self._stderr_tail)[-4:])
        message = f"The generation worker {why}; the next request starts a new one." + (f"\n{tail}" if tail else "")
        self._gone(proc, message)

    def _gone(self, proc: QProcess, message: str) -> None:
        self._proc = None
        self._ready = False
        self._queue.clear()
        self.pending.clear()
        self.model, self.adapters = None, {}
        proc.deleteLater()
        if message:
            self.died.emit(message)
