"""The sandboxed worker that runs a person's reward function: ``python -I -B _sandbox_worker.py`` (see ``sandbox``).

Standard library only, and imports nothing of the project: it is started as a file, in a fresh interpreter that
ignores the environment, the user's site folder and the working folder (``-I``).

Protocol, JSON lines on its own copies of stdin/stdout (the function's ``print`` goes to stderr, its ``input()``
reads nothing): the parent sends the set-up line ``{"path", "function", "scratch", "memory_mb", "cpu_s",
"file_size_mb", "max_message_bytes"}``; the worker answers ``{"ok": true, "ready": true, "layers": {...}}`` once the
function is loaded, or ``{"ok": false, ...}``. Then for each request ``{"prompts", "completions", "columns"}`` one
answer: ``{"ok": true, "scores": [...]}`` or ``{"ok": false, "error": KIND, "message", "traceback"}`` with KIND one
of ``load``, ``exception``, ``memory``, ``refused``, ``result``, ``protocol``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import traceback
from typing import Any

MAX_TRACEBACK = 6000


class Guard:
    """The audit hook's state: ``trusted`` while the worker itself acts (setting the CPU limit), and every action
    it refused, so that a refusal the function caught and ignored is still reported."""

    def __init__(self, scratch: str):
        self.scratch = os.path.realpath(scratch)
        self.trusted = False
        self.refused: list[str] = []

    def inside(self, path: Any, follow: bool = True) -> bool:
        """Whether ``path`` lies in the scratch folder. ``follow``: where a symbolic link at ``path`` points (what
        writing through it changes); else the link itself (what removing or renaming it changes)."""
        if isinstance(path, int):  # an open file descriptor: opening one was checked already
            return True
        try:
            text = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        head, name = os.path.split(text)
        if follow or name in ("", ".", ".."):
            real = os.path.realpath(text)
        else:
            real = os.path.join(os.path.realpath(head or "."), name)
        return real == self.scratch or real.startswith(self.scratch + os.sep) or real == os.devnull

    def check(self, event: str, args: tuple[Any, ...]) -> str | None:
        """Why ``event`` is refused, or None."""
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            if isinstance(flags, int):
                writes = writes or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC))
            if writes and not self.inside(path):
                return f"write to {_show(path)}, outside its scratch folder"
            return None
        if event.startswith("socket."):
            return f"use the network ({_network(event, args)})"
        if event in _PROCESS:
            return f"start another program or process ({event}{_args(args)})"
        if event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            return f"send a signal to a process ({event}{_args(args)})"
        if event in _CTYPES:
            return f"call C code through ctypes ({event})"
        if event in ("resource.setrlimit", "resource.prlimit"):
            return "change its own limits (resource.setrlimit)"
        if event in _PATHS:
            verb = "write to" if event in _WRITES_TO else "change"
            for index, fd_index in _PATHS[event]:
                if index >= len(args):
                    continue
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                target = _resolve(args[index], dir_fd)
                if target is None:
                    return f"change a file relative to a folder descriptor it cannot place ({event})"
                if not self.inside(target, follow=event not in _ON_THE_LINK):
                    return f"{verb} {_show(target)}, outside its scratch folder ({event})"
            return None
        if event == "sqlite3.connect":
            database = args[0] if args else ""
            if database not in (":memory:", "", b":memory:") and not self.inside(database):
                return f"open the database {_show(database)}, outside its scratch folder"
        return None


_PROCESS = frozenset(
    {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile"}
)
# ctypes.dlopen stays allowed: numpy and other ordinary libraries load their C parts through it on import.
_CTYPES = frozenset(
    {
        "ctypes.call_function",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
        "ctypes.cdata",
        "ctypes.cdata/buffer",
        "ctypes.string_at",
        "ctypes.wstring_at",
        "ctypes.PyObj_FromPtr",
    }
)
# event -> (index of a path it changes, index of the folder descriptor that path is relative to, or None), for each
# path (the order of the audit event's arguments in CPython). Removing through an outside path's hard link, or a
# rename out of the folder, changes an outside file too, so both of a rename's and a link's paths are checked.
_PATHS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),),
    "os.lchown": ((0, None),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
    "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),),
    "shutil.rmtree": ((0, 1),),
    "shutil.chown": ((0, None),),
    "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),),
    "shutil.copystat": ((1, None),),
    "shutil.copytree": ((1, None),),
}
# Events that act on a symbolic link itself, not on what it points to.
_ON_THE_LINK = frozenset({"os.remove", "os.rmdir", "os.rename", "os.symlink", "os.lchown", "os.lchflags"})
_WRITES_TO = frozenset({"os.symlink", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree"})


def _resolve(path: Any, dir_fd: Any) -> Any:
    """``path`` as seen from the working folder: joined to its folder descriptor's place when it has one (Linux's
    /proc tells it); None when that place cannot be found."""
    if isinstance(path, int) or not isinstance(dir_fd, int) or isinstance(dir_fd, bool) or dir_fd < 0:
        return path
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        return path
    if os.path.isabs(text):
        return text
    try:
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), text)
    except OSError:
        return None


def _show(path: Any) -> str:
    try:
        return repr(os.path.realpath(os.fsdecode(os.fspath(path))))
    except TypeError:
        return repr(path)


def _network(event: str, args: tuple[Any, ...]) -> str:
    if event == "socket.__new__":
        return "opened a socket"
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") and len(args) > 1:
        return f"{event.split('.')[1]} {args[1]!r}"[:160]
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        return f"looked up {args[0]!r}"[:160] if args else "looked up a host name"
    return event


def _args(args: tuple[Any, ...]) -> str:
    text = ", ".join(repr(a) for a in args[:3])
    return f": {text[:160]}" if text else ""


def isolate_network() -> str:
    """Move this process into a new, empty network namespace (Linux); what worked, or why not."""
    flags = {"CLONE_NEWUSER": 0x10000000, "CLONE_NEWNET": 0x40000000}
    unshare = getattr(os, "unshare", None)
    if unshare is None:
        if not sys.platform.startswith("linux"):
            return "unavailable: not Linux"
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)

        def unshare(mask: int) -> None:
            if libc.unshare(mask) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    uid, gid = os.geteuid(), os.getegid()
    try:
        unshare(flags["CLONE_NEWUSER"] | flags["CLONE_NEWNET"])
    except OSError as exc:
        try:
            unshare(flags["CLONE_NEWNET"])  # root needs no user namespace
            return "network namespace"
        except OSError:
            return f"unavailable: {exc.strerror}"
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass
    return "user and network namespace"


def set_limits(config: dict[str, Any]) -> list[str]:
    mib = 1024 * 1024
    done = []
    for name, value in (
        ("RLIMIT_AS", int(config["memory_mb"]) * mib),
        ("RLIMIT_FSIZE", int(config["file_size_mb"]) * mib),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NOFILE", 256),
    ):
        limit = getattr(resource, name, None)
        if limit is None:
            continue
        try:
            _, hard = resource.getrlimit(limit)
            soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (soft, hard))
            done.append(name)
        except (OSError, ValueError):
            pass
    return done


def set_cpu_limit(guard: Guard, seconds: float) -> None:
    """Allow ``seconds`` more of CPU time from now (RLIMIT_CPU counts the process's whole life)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    guard.trusted = True
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    finally:
        guard.trusted = False


class Channel:
    """JSON lines on the worker's private copies of stdin and stdout."""

    def __init__(self, max_bytes: int = 1 << 20):
        self.inp = os.fdopen(os.dup(0), "rb")
        self.out = os.dup(1)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)  # input() and sys.stdin read nothing
        os.dup2(2, 1)  # print() goes to stderr, which the parent keeps for messages
        os.close(null)
        self.max_bytes = max_bytes

    def read(self) -> Any:
        line = self.inp.readline(self.max_bytes + 1)
        if not line:
            return None
        if len(line) > self.max_bytes:
            raise ValueError(f"a request longer than {self.max_bytes} bytes")
        return json.loads(line)

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.out, view) :]


def tidy_traceback(exc: BaseException) -> str:
    """The traceback from the person's code down (the worker's own frames left out), cut to a readable size."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text if len(text) <= MAX_TRACEBACK else "...\n" + text[-MAX_TRACEBACK:]


def as_scores(value: Any) -> tuple[list[Any] | None, str]:
    """The function's result as a JSON-able list (numpy scalars and arrays turned into floats), or why not."""
    if not isinstance(value, (list, tuple)) and hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None, f"must return a list of numbers (one per completion), not {type(value).__name__}"
    out: list[Any] = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or item is None or isinstance(item, (str, bytes)):
            return None, f"score {i} is {item!r} ({type(item).__name__}); return a number for every completion"
        if isinstance(item, float) or (isinstance(item, int) and abs(item) < 2**63):
            out.append(item)
            continue
        try:
            out.append(float(item))
        except OverflowError:
            return None, f"score {i} is too large for a float; keep scores in a small range"
        except (TypeError, ValueError):
            return None, f"score {i} is {type(item).__name__}, not a number; return a number for every completion"
    return out, ""


def main() -> int:
    sys.dont_write_bytecode = True
    channel = Channel()
    first = channel.read()
    channel.max_bytes = int(first["max_message_bytes"])
    guard = Guard(first["scratch"])
    os.chdir(guard.scratch)
    layers = {"network": isolate_network(), "limits": ", ".join(set_limits(first))}

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if guard.trusted:
            return
        reason = guard.check(event, args)
        if reason is not None:
            guard.refused.append(reason)
            raise PermissionError(f"refused by the reward sandbox: tried to {reason}")

    sys.addaudithook(hook)
    layers["audit_hook"] = "on"
    path, function = first["path"], first["function"]
    try:
        sys.path.insert(0, os.path.dirname(path))  # the person's helper modules beside their file
        spec = importlib.util.spec_from_file_location("reward_module", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = getattr(module, function, None)
        if not callable(fn):
            got = "is missing" if fn is None else f"is a {type(fn).__name__}, not a function"
            channel.send({"ok": False, "error": "load", "message": f"{function} {got} after loading the file"})
            return 1
    except BaseException as exc:  # the person's module: anything can happen on import
        kind = "memory" if isinstance(exc, MemoryError) else "refused" if guard.refused else "load"
        message = guard.refused[0] if guard.refused else f"{type(exc).__name__}: {exc}"
        channel.send({"ok": False, "error": kind, "message": message, "traceback": tidy_traceback(exc)})
        return 1
    if guard.refused:
        channel.send({"ok": False, "error": "refused", "message": guard.refused[0]})
        return 1
    channel.send({"ok": True, "ready": True, "layers": layers})

    while True:
        try:
            request = channel.read()
        except ValueError as exc:
            channel.send({"ok": False, "error": "protocol", "message": str(exc)})
            return 1
        if request is None:  # the parent closed the pipe: it is done with this worker, or it ended
            guard.trusted = True
            shutil.rmtree(guard.scratch, ignore_errors=True)
            return 0
        set_cpu_limit(guard, float(first["cpu_s"]))
        try:
            result = fn(prompts=request["prompts"], completions=request["completions"], **request["columns"])
        except MemoryError:
            result = None
            reply = {"ok": False, "error": "memory", "message": "MemoryError"}
        except BaseException as exc:
            result = None
            reply = {"ok": False, "error": "exception", "message": f"{type(exc).__name__}: {exc}"}
            reply["traceback"] = tidy_traceback(exc)
        else:
            scores, why = as_scores(result)
            reply = {"ok": True, "scores": scores} if scores is not None else {"ok": False, "error": "result"}
            if why:
                reply["message"] = why
        if guard.refused:
            reply = {"ok": False, "error": "refused", "message": guard.refused[0], "traceback": reply.get("traceback")}
        channel.send(reply)
        if not reply["ok"]:
            return 1


if __name__ == "__main__":
    sys.exit(main())
