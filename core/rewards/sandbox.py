"""A person's Python reward function, run in a separate, limited process: never in the engine's or the app's.

:class:`SandboxedReward` is a reward function with TRL's contract (``fn(prompts=..., completions=..., **columns)
-> list[float]``) whose body runs in a long-lived worker process (``_sandbox_worker.py``, started with
``python -I -B``: no environment variables, user site or working folder on its path, no bytecode written). Data in
and scores out go as JSON lines over pipes, each message at most ``max_message_bytes``. The worker starts at the
first call and again after any failure, which ends it.

The layers, and what each stops:

- **Wall-clock timeout** (the parent): a call that has not answered in ``timeout_s`` has its whole process group
  killed. Stops anything that hangs: endless loops, waiting on input, sleeping.
- **CPU time** (``RLIMIT_CPU``, the kernel): each call may use ``cpu_s`` more seconds of CPU; past that the kernel
  ends the worker (SIGXCPU). Stops busy loops, also ones that spread over threads.
- **Memory** (``RLIMIT_AS``, the kernel): the worker's address space is capped at ``memory_mb``; allocations past
  it fail (``MemoryError`` in Python, usually a crash in C code). Stops unbounded allocation before it takes the
  machine's memory. It caps address space, not resident memory: libraries that reserve large ranges up front
  (torch, CUDA, many-threaded BLAS) need a higher ``memory_mb`` than the memory they use. Files it writes are
  capped at ``file_size_mb`` (``RLIMIT_FSIZE``), core dumps are off and it may hold 256 open files.
- **Network namespace** (Linux, the kernel): the worker moves into a new user and network namespace, which has no
  interfaces but a down loopback, so no connection leaves it even from C code. Where the kernel refuses
  unprivileged user namespaces this layer is missing (``layers["network"]`` says which it got) and only the audit
  hook below keeps the network away.
- **Audit hook** (``sys.addaudithook``, in the worker): refuses, with a ``PermissionError`` that is also reported
  if the function catches it, sockets (``socket.*``), starting programs (``subprocess``, ``os.system``,
  ``os.exec*``, ``os.fork``, ``os.posix_spawn``...), signals to other processes, ctypes calls, changing its own
  limits, and opening for writing, creating, removing, renaming, linking or changing files outside its scratch
  folder. The scratch folder is a fresh temporary folder, the worker's working folder, ``HOME`` and ``TMPDIR``;
  it is deleted when the worker ends. Reading files is allowed (the function's own modules and data).
- **Its parent's end**: the worker reads its requests from a pipe; when the parent process ends, the pipe closes
  and the worker exits at its next read (one stuck in a loop is ended by its CPU limit).
- **Cleared environment**: the worker sees only ``PATH``, ``HOME``, ``TMPDIR``, a UTF-8 locale and one-thread
  settings for numerical libraries: no tokens, keys or proxies from the parent's environment.

What this is not: an audit hook is not a security boundary. It guards against mistakes and ordinary code (a
function that loops, grows a list for ever, calls a web API, writes a cache file next to the data, shells out),
not against code written to escape: C extensions, ``_posixsubprocess`` or a crafted object can act without raising
an audit event. The kernel layers (time, memory, network namespace) hold for any code; the file-system and process
rules do not. Run reward functions you wrote or read, as you would run any script of your own.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_studio.core.rewards.base import RewardError, check_scores
from finetune_studio.core.rewards.spec import RewardSpec

WORKER = Path(__file__).with_name("_sandbox_worker.py")
STDERR_TAIL = 4000


@dataclass(frozen=True)
class SandboxLimits:
    """What one worker may use. ``cpu_s`` None: the same as ``timeout_s``."""

    timeout_s: float = 30.0
    cpu_s: float | None = None
    memory_mb: int = 2048
    file_size_mb: int = 64
    startup_timeout_s: float = 60.0
    max_message_bytes: int = 64 * 1024 * 1024

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_s if self.cpu_s is not None else self.timeout_s


class _Worker:
    """One worker process with its scratch folder and the reading side of its pipes."""

    def __init__(self, proc: subprocess.Popen[bytes], scratch: str):
        self.proc = proc
        self.scratch = scratch
        self.stderr = bytearray()
        self.killed = False
        self.layers: dict[str, str] = {}

    def stop(self) -> None:
        """Kill the worker's whole process group and remove its scratch folder (safe to call twice)."""
        proc = self.proc
        if proc.poll() is None:
            self.killed = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _stop_all(holder: list[_Worker]) -> None:
    while holder:
        holder.pop().stop()


class SandboxedReward:
    """``function`` from the Python file ``path``, run in a sandboxed worker (see the module's docstring).

    Calling it returns one float per completion or raises :class:`RewardError` naming the function and what to
    change: it ran past its time or CPU limit, ran out of memory, tried something the sandbox refuses, raised (the
    message carries its traceback), or returned the wrong type, the wrong number of scores, NaN or infinity.
    """

    def __init__(
        self,
        path: str | Path,
        function: str = "reward",
        *,
        name: str | None = None,
        limits: SandboxLimits | None = None,
    ):
        if os.name != "posix":
            raise RewardError(name or function, "Python reward functions run on Linux and macOS only")
        self.path = str(Path(path).resolve())
        self.function = function
        self.name = name or function
        self.limits = limits or SandboxLimits()
        self._holder: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._holder)

    @classmethod
    def from_spec(cls, spec: RewardSpec) -> SandboxedReward:
        params = spec.params
        limits = SandboxLimits(timeout_s=float(params["timeout_s"]), memory_mb=int(params["memory_mb"]))
        return cls(params["path"], str(params["function"]), name=spec.name, limits=limits)

    @property
    def layers(self) -> dict[str, str]:
        """What the running worker got: ``network`` (the namespace, or why not), ``limits``, ``audit_hook``."""
        return dict(self._holder[0].layers) if self._holder else {}

    def close(self) -> None:
        """End the worker (a later call starts a new one)."""
        _stop_all(self._holder)

    def __call__(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any
    ) -> list[float]:
        n = len(completions)
        request = {
            "prompts": list(prompts) if prompts is not None else [None] * n,
            "completions": list(completions),
            "columns": {k: list(v) for k, v in columns.items()},
        }
        try:
            data = (json.dumps(request, default=str) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise RewardError(self.name, f"the batch cannot be sent as JSON: {exc}") from None
        if len(data) > self.limits.max_message_bytes:
            raise RewardError(
                self.name,
                f"the batch is {len(data) / 2**20:.1f} MiB as JSON, over the {self.limits.max_message_bytes / 2**20:g} "
                "MiB a call may send; use smaller batches or fewer columns",
            )
        worker = self._holder[0] if self._holder else self._start()
        try:
            reply = self._exchange(worker, data, self.limits.timeout_s)
        except RewardError:
            self.close()
            raise
        if not reply.get("ok"):
            self.close()
            raise self._failure(reply, worker)
        try:
            return check_scores(self.name, reply.get("scores"), n)
        except RewardError as exc:
            self.close()
            raise RewardError(self.name, f"{self._where()} {exc.reason}") from None

    # --- the worker ----------------------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.function}() in {self.path}"

    def _start(self) -> _Worker:
        scratch = tempfile.mkdtemp(prefix="reward-scratch-")
        env = {
            "PATH": os.defpath,
            "HOME": scratch,
            "TMPDIR": scratch,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=scratch,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
                close_fds=True,
            )
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise RewardError(self.name, f"cannot start the sandbox process: {exc}") from None
        worker = _Worker(proc, scratch)
        self._holder.append(worker)
        setup = {
            "path": self.path,
            "function": self.function,
            "scratch": scratch,
            "memory_mb": self.limits.memory_mb,
            "cpu_s": self.limits.cpu_seconds,
            "file_size_mb": self.limits.file_size_mb,
            "max_message_bytes": self.limits.max_message_bytes,
        }
        try:
            reply = self._exchange(
                worker, (json.dumps(setup) + "\n").encode(), self.limits.startup_timeout_s, loading=True
            )
        except RewardError:
            self.close()
            raise
        if not reply.get("ok"):
            self.close()
            raise self._failure(reply, worker, loading=True)
        worker.layers = {str(k): str(v) for k, v in dict(reply.get("layers") or {}).items()}
        return worker

    def _exchange(self, worker: _Worker, data: bytes, timeout_s: float, loading: bool = False) -> dict[str, Any]:
        """Send ``data`` and read one reply line, within ``timeout_s`` seconds (wall clock)."""
        proc = worker.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        limit = self.limits.max_message_bytes
        pending = memoryview(data)
        reply = bytearray()
        with selectors.DefaultSelector() as sel:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                os.set_blocking(pipe.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    worker.stop()
                    raise RewardError(self.name, self._timeout_message(timeout_s, loading))
                for key, _ in sel.select(min(left, 1.0)):
                    if key.fileobj is proc.stdin:
                        try:
                            pending = pending[os.write(proc.stdin.fileno(), pending) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(proc.stdin)
                        continue
                    chunk = os.read(key.fd, 65536)
                    if key.fileobj is proc.stderr:
                        if chunk:
                            worker.stderr += chunk
                            del worker.stderr[:-STDERR_TAIL]
                        else:
                            sel.unregister(proc.stderr)
                        continue
                    if not chunk:  # the worker closed its end: it ended
                        worker.stop()
                        raise RewardError(self.name, self._exit_message(worker))
                    reply += chunk
                    if b"\n" in reply:
                        line = bytes(reply[: reply.index(b"\n")])
                        try:
                            message = json.loads(line)
                        except ValueError:
                            worker.stop()
                            raise RewardError(self.name, "the sandbox answered garbled data; this is a bug") from None
                        if not isinstance(message, dict):
                            worker.stop()
                            raise RewardError(self.name, "the sandbox answered garbled data; this is a bug")
                        return message
                    if len(reply) > limit:
                        worker.stop()
                        raise RewardError(self.name, f"the sandbox's answer passed {limit} bytes and was cut off")

    # --- messages ------------------------------------------------------------------------------------------------
    def _timeout_message(self, timeout_s: float, loading: bool) -> str:
        if loading:
            return (
                f"loading {self.path} did not finish within {timeout_s:g} s and was stopped; look for slow work or "
                "a loop at the top level of the file (run it inside the function instead)"
            )
        return (
            f"{self._where()} did not answer within {timeout_s:g} s (wall clock) and was stopped; look for an "
            "endless loop or a wait, make it faster, or raise the reward's timeout_s if it is meant to be slow"
        )

    def _exit_message(self, worker: _Worker) -> str:
        code = worker.proc.returncode
        tail = bytes(worker.stderr).decode("utf-8", "replace").strip()
        said = f"\nIts last output:\n{tail[-1500:]}" if tail else ""
        if code == -signal.SIGXCPU:
            return (
                f"{self._where()} used more than {self.limits.cpu_seconds:g} s of CPU time on one batch and was "
                "stopped; look for an endless loop, or make it cheaper"
            )
        if code in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT):
            name = signal.Signals(-code).name
            return (
                f"{self._where()} crashed ({name}), often a C library running out of the {self.limits.memory_mb} "
                f"MiB memory limit; use less memory or raise the reward's memory_mb{said}"
            )
        if code == -signal.SIGKILL:
            return (
                f"{self._where()} was killed by the system (SIGKILL), most likely for using too much memory; "
                f"use less memory or lower the reward's memory_mb{said}"
            )
        if code is not None and code < 0:
            return f"{self._where()} was ended by {signal.Signals(-code).name}{said}"
        return f"{self._where()} ended (exit code {code}) instead of returning scores; do not call exit(){said}"

    def _failure(self, reply: dict[str, Any], worker: _Worker, loading: bool = False) -> RewardError:
        kind = reply.get("error")
        message = str(reply.get("message", ""))
        trace = str(reply.get("traceback") or "").rstrip()
        where = self._where()
        if kind == "memory":
            text = (
                f"{where} ran out of its {self.limits.memory_mb} MiB memory limit (MemoryError); use less memory "
                "(smaller data structures, no unbounded lists) or raise the reward's memory_mb"
            )
        elif kind == "refused":
            text = (
                f"{where} tried to {message} and was stopped. Reward functions run without network, may write "
                "files only in their scratch folder (their working folder, also HOME and TMPDIR) and may not "
                "start other programs; score from the prompts, completions and columns they are given"
            )
        elif kind == "exception":
            text = f"{where} raised {message}; fix the function\n{trace}"
        elif kind == "result":
            text = f"{where} {message}"
        elif kind == "load" or loading:
            text = f"loading {self.path} failed: {message}; fix the file so that it imports on its own\n{trace}"
        else:
            text = f"the sandbox reported {kind}: {message}"
        return RewardError(self.name, text.rstrip())
