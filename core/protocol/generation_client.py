"""A small blocking client for the generation worker (no ML or Qt import): for scripts, benchmarks and tests.

The studio drives the worker through QProcess itself; this is the same protocol from plain Python::

    with GenerationClient() as client:
        client.call(LoadModel(id="l1", model="default"))
        for reply in client.stream(Generate(id="g1", prompt="Hi", n=4)):
            ...  # Delta, Done, ..., then the final Generated (or Error)

If the worker dies, a waiting call raises :class:`WorkerDied` at once (no hang); the next request starts a new
worker, which has no model loaded yet.
"""

from __future__ import annotations

import collections
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator

from finetune_studio.core.paths import python_argv
from finetune_studio.core.protocol import generation as gp


class WorkerDied(RuntimeError):
    """The worker process ended while a reply was awaited."""


class RequestFailed(RuntimeError):
    """The worker answered a request with an :class:`~core.protocol.generation.Error` (``error`` holds it)."""

    def __init__(self, error: gp.Error) -> None:
        super().__init__(error.message)
        self.error = error


def worker_argv(threads: int = 0) -> list[str]:
    return [*python_argv(), "-m", "finetune_studio.engine", "serve", "--threads", str(threads)]


class GenerationClient:
    def __init__(self, argv: list[str] | None = None, env: dict[str, str] | None = None, threads: int = 0) -> None:
        self.argv = argv or worker_argv(threads)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.ready: gp.Ready | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._replies: queue.Queue[gp.Reply | None] = queue.Queue()
        self._stash: dict[str, list[gp.Reply]] = collections.defaultdict(list)
        self._send_lock = threading.Lock()

    # process ---------------------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120) -> gp.Ready:
        """Start a worker (ending a previous one) and wait for its ``ready``."""
        self.close()
        self._replies = queue.Queue()
        self._stash.clear()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(self.env or {})},
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        threading.Thread(target=self._read_stdout, args=(self.proc, self._replies), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True).start()
        ready = self._next("", timeout)
        if not isinstance(ready, gp.Ready):
            raise WorkerDied(f"the worker started with {ready.type!r} instead of 'ready'")
        self.ready = ready
        return ready

    def _read_stdout(self, proc: subprocess.Popen[str], out: queue.Queue[gp.Reply | None]) -> None:
        assert proc.stdout is not None  # opened with stdout=PIPE
        for line in proc.stdout:
            if not line.strip():
                continue
            try:
                out.put(gp.parse_reply(line))
            except gp.ProtocolError as exc:
                self.stderr_tail.append(f"(unreadable reply: {exc})")
        out.put(None)  # end of output: the worker has exited

    def _read_stderr(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None  # opened with stderr=PIPE
        for line in proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))

    def close(self, timeout: float = 10) -> None:
        """Ask the worker to shut down; kill it if it does not within ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            assert proc.stdin is not None  # opened with stdin=PIPE
            try:
                proc.stdin.write(gp.Shutdown(id="__close__").to_json() + "\n")
                proc.stdin.flush()
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None  # both opened with PIPE
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # requests --------------------------------------------------------------------------------------------------

    def send(self, request: gp.Request) -> None:
        """Write one request, starting a new worker first if there is none (or it died)."""
        if not self.alive:
            self.start()
        with self._send_lock:
            assert self.proc is not None and self.proc.stdin is not None  # start() set both
            try:
                self.proc.stdin.write(request.to_json() + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise WorkerDied(self._death(f"could not send {request.type!r}: {exc}")) from None

    def send_line(self, line: str) -> None:
        """Write a raw line (to test how the worker answers malformed input)."""
        if not self.alive:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None  # start() set both
        self.proc.stdin.write(line.rstrip("\n") + "\n")
        self.proc.stdin.flush()

    def replies(self, request_id: str, timeout: float = 300) -> Iterator[gp.Reply]:
        """The replies to ``request_id`` as they arrive, ending with its final one."""
        while True:
            reply = self._next(request_id, timeout)
            yield reply
            if gp.is_final(reply):
                return

    def stream(self, request: gp.Request, timeout: float = 300) -> Iterator[gp.Reply]:
        self.send(request)
        return self.replies(request.id, timeout)

    def call(self, request: gp.Request, timeout: float = 300) -> list[gp.Reply]:
        """Send ``request`` and return all its replies, the final one last."""
        return list(self.stream(request, timeout))

    def score(self, request: gp.Score, timeout: float = 300) -> gp.Scores:
        """Send a :class:`~core.protocol.generation.Score` request and return its :class:`Scores` (one float per
        candidate, in order); :class:`RequestFailed` when the worker answers with an error."""
        final = self.call(request, timeout)[-1]
        if isinstance(final, gp.Error):
            raise RequestFailed(final)
        if not isinstance(final, gp.Scores):
            raise RequestFailed(gp.Error(id=request.id, message=f"score was answered with {final.type!r}"))
        return final

    def _next(self, request_id: str, timeout: float) -> gp.Reply:
        stash = self._stash.get(request_id)
        if stash:
            return stash.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {request_id!r} within {timeout:.0f} s")
            try:
                reply = self._replies.get(timeout=left)
            except queue.Empty:
                continue
            if reply is None:
                self._replies.put(None)  # later waits see the death too
                raise WorkerDied(self._death(f"the worker exited while {request_id!r} awaited a reply"))
            if reply.id == request_id:
                return reply
            self._stash[reply.id].append(reply)

    def _death(self, what: str) -> str:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
        tail = "\n".join(list(self.stderr_tail)[-8:])
        return f"{what} (exit code {code}){': ' + tail if tail else ''}"
