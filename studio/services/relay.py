"""Run a command in a session of its own and relay its output, so it can outlive the app.

    python -m finetune_studio.studio.services.relay COMMAND [ARGS...]

The studio's QProcess runs this rather than the engine itself. The command
runs in a new session (not in the app's process group, no SIGHUP from a
closing terminal); its stdout and stderr are copied through; SIGTERM and SIGINT
are forwarded to it, SIGUSR1 kills it; the relay exits with the command's exit status.

When the relay's stdin closes (the app asks to let the run continue, or the app
itself dies), the relay exits at once and leaves the command running; the
engine then finds its stdout closed and carries on, writing to the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

NOT_STARTED = 127  # the command could not be started (the message is on stderr)
DETACHED = 0


def _copy(src_fd: int, dst_fd: int) -> None:
    while True:
        try:
            data = os.read(src_fd, 65536)
        except OSError:
            return
        if not data:
            return
        try:
            os.write(dst_fd, data)
        except OSError:  # the app went away: keep draining so the child never blocks
            pass


def _watch_stdin() -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(DETACHED)  # leave the child running on its own


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: python -m finetune_studio.studio.services.relay COMMAND [ARGS...]\n")
        return 2
    try:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
    except OSError as exc:
        sys.stderr.write(f"could not start {argv[0]}: {exc.strerror or exc}\n")
        return NOT_STARTED

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    def kill(_signum, _frame):
        try:
            child.kill()
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGUSR1, kill)  # the app's "kill": SIGKILL cannot be forwarded
    assert child.stdout is not None and child.stderr is not None
    copiers = [
        threading.Thread(target=_copy, args=(child.stdout.fileno(), 1), daemon=True),
        threading.Thread(target=_copy, args=(child.stderr.fileno(), 2), daemon=True),
    ]
    for t in copiers:
        t.start()
    threading.Thread(target=_watch_stdin, daemon=True).start()
    code = child.wait()
    for t in copiers:
        t.join()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
