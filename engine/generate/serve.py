"""``python -m finetune_studio.engine serve``: the generation worker (protocol in :mod:`core.protocol.generation`).

Two threads. The reader thread parses stdin's lines: a malformed line is answered at once with an error, a
cancel sets the running request's flag (or drops a queued one) and is answered at once, everything else is
queued. The main thread serves the queue one request at a time. End of stdin (the caller went away) or a
shutdown request cancels what runs and ends the process. A line longer than the protocol's ``MAX_LINE_BYTES`` is
answered with an error and skipped without being held in memory; no line, however malformed, ends the reader.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import traceback

from finetune_studio.core.protocol import generation as gp

log = logging.getLogger("engine.generate.serve")


def _ends_line(chunk: str | bytes) -> bool:
    return chunk[-1:] in ("\n", b"\n")


def default_threads() -> int:
    """Half the CPU cores this process may use, 1 to 8: on a 2-core machine shared with other work, one thread
    decodes faster than two (the second thread fights for the core other processes use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


class _Writer:
    """Replies go out whole, one per line, from either thread."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, reply: gp.Reply) -> None:
        line = reply.to_json() + "\n"
        with self.lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the caller is gone; the reader sees end of input and stops us


class Worker:
    def __init__(self, emit: _Writer):
        from finetune_studio.engine.generate.generator import Session

        self.emit = emit
        self.session = Session()
        self.queue: queue.Queue[gp.Request | None] = queue.Queue()
        self.lock = threading.Lock()
        self.current: gp.Request | None = None
        self.current_cancel = threading.Event()
        self.queued: set[str] = set()
        self.dropped: set[str] = set()
        self.closing = False  # shutdown asked or stdin closed: what is still queued is answered, not run

    # reader thread ---------------------------------------------------------------------------------------------

    def read(self, stdin) -> None:
        """Read request lines until end of input (text or bytes lines; at most :data:`gp.MAX_LINE_BYTES` each).

        Whatever one line holds, the loop goes on: a line that cannot be parsed (for whatever reason) is answered
        with an Error, and a line over the limit is answered with an Error and skipped unread. When input ends (or
        this loop fails), what runs is cancelled and the main thread is told to end.
        """
        limit = gp.MAX_LINE_BYTES
        try:
            while True:
                raw = stdin.readline(limit + 1)
                if not raw:
                    break
                if len(raw) > limit and not _ends_line(raw):
                    rid = gp.request_id_of(raw)
                    del raw
                    ended = self._skip_line(stdin, limit)
                    message = (
                        f"bad request: the line is longer than {limit // 2**20} MiB ({limit:,} bytes), the most a "
                        f"request may be; it was not read (shorten the prompts, or send fewer per request)"
                    )
                    self.emit(gp.Error(id=rid, message=message, kind="bad_request"))
                    if not ended:
                        break
                    continue
                try:
                    self._take(raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw)
                except Exception as exc:  # never let one line end the reader: the worker would go deaf
                    log.error("could not take a request line:\n%s", traceback.format_exc())
                    self.emit(gp.Error(id="", message=f"bad request: {type(exc).__name__}", kind="bad_request"))
        finally:
            self._cancel_all(closing=True)
            self.queue.put(None)

    @staticmethod
    def _skip_line(stdin, limit: int) -> bool:
        """Read and drop the rest of a line, ``limit`` at a time; False when input ended first."""
        while True:
            chunk = stdin.readline(limit)
            if not chunk:
                return False
            if _ends_line(chunk):
                return True

    def _take(self, raw: str) -> None:
        line = raw.strip()
        if not line:
            return
        try:
            req = gp.parse_request(line)
        except Exception as exc:  # a ProtocolError names the problem; anything else is still a bad line
            message = str(exc) if isinstance(exc, gp.ProtocolError) else f"{type(exc).__name__}: {str(exc)[:200]}"
            self.emit(gp.Error(id=gp.request_id_of(line), message=f"bad request: {message}", kind="bad_request"))
            return
        if isinstance(req, gp.Cancel):
            self.emit(gp.Cancelled(id=req.id, target=req.target, found=self._cancel(req.target)))
            return
        if isinstance(req, gp.Shutdown):
            self._cancel_all(closing=True)
        with self.lock:
            self.queued.add(req.id)
        self.queue.put(req)

    def _cancel(self, target: str) -> bool:
        with self.lock:
            if self.current is not None and self.current.id == target:
                self.current_cancel.set()
                return True
            if target in self.queued:
                self.dropped.add(target)
                return True
            return False

    def _cancel_all(self, closing: bool) -> None:
        with self.lock:
            self.closing = self.closing or closing
            self.dropped |= self.queued
            self.current_cancel.set()

    # main thread -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            req = self.queue.get()
            if req is None:
                return 0
            with self.lock:
                self.queued.discard(req.id)
                dropped = req.id in self.dropped
                self.dropped.discard(req.id)
                self.current = req
                self.current_cancel = threading.Event()
                if dropped:
                    self.current_cancel.set()
            try:
                if isinstance(req, gp.Shutdown):
                    self.emit(gp.Bye(id=req.id))
                    return 0
                if self.closing:
                    self.emit(gp.Error(id=req.id, message="not run: the worker is shutting down", kind="error"))
                    continue
                self.emit(self.handle(req, self.current_cancel))
            finally:
                with self.lock:
                    self.current = None

    def handle(self, req: gp.Request, cancel: threading.Event) -> gp.Reply:
        import torch

        from finetune_studio.engine.generate.generator import GenerationError

        s = self.session
        try:
            if isinstance(req, gp.LoadModel):
                return s.load(req)
            if isinstance(req, gp.AttachAdapter):
                return s.attach(req)
            if isinstance(req, gp.SetActive):
                return s.set_active(req)
            if isinstance(req, gp.DetachAdapter):
                return s.detach(req)
            if isinstance(req, gp.Generate):
                return s.generate(req, self.emit, cancel)
            if isinstance(req, gp.GenerateBatch):
                return s.generate_batch(req, self.emit, cancel)
            if isinstance(req, gp.Score):
                return s.score(req)
            if isinstance(req, gp.Unload):
                s.unload()
                return gp.Unloaded(id=req.id)
            return gp.Error(id=req.id, message=f"request type {req.type!r} is not served here", kind="bad_request")
        except GenerationError as exc:
            return gp.Error(id=req.id, message=exc.message, kind=exc.kind)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return gp.Error(
                id=req.id,
                message="out of memory: ask for fewer candidates or fewer new tokens, or load a smaller model",
                kind="oom",
                detail=str(exc),
            )
        except Exception as exc:
            log.error("request %s (%s) failed:\n%s", req.id, req.type, traceback.format_exc())
            return gp.Error(id=req.id, message=f"{req.type} failed: {type(exc).__name__}: {exc}", detail=repr(exc))


def serve(stdin, stream, threads: int = 0) -> int:
    """Serve requests from ``stdin`` (a binary or text stream of lines) with replies on ``stream`` until shutdown or
    end of input."""
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    emit = _Writer(stream)
    worker = Worker(emit)
    reader = threading.Thread(target=worker.read, args=(stdin,), name="serve-stdin", daemon=True)
    reader.start()
    from finetune_studio.engine.models import pick_device

    device = pick_device()
    emit(gp.Ready(id="", pid=os.getpid(), device="cpu" if device == "mps" else device, threads=threads))
    log.info("generation worker ready (pid %d, %d CPU threads)", os.getpid(), threads)
    return worker.run()


def main(threads: int, stream) -> int:
    stdin = open(sys.stdin.fileno(), "rb", closefd=False)  # bytes: the line limit counts bytes; decoded per line
    return serve(stdin, stream, threads)
