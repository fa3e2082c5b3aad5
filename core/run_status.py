"""A run's status, as the database stores it, and the rules built on it.

``RunStatus`` is a ``StrEnum``: its members are the very strings in the ``runs`` table, so rows written
before it existed read back unchanged and a member compares equal to its string. The engine (resume,
export), the store and the studio's pages all ask these functions; none keeps its own list.

    created      the row exists; training has not begun
    running      a process is training it (the store reports ``interrupted`` once that process is gone)
    completed    trained to the end; the final adapter is saved
    stopped      stopped on request after saving a checkpoint
    failed       ended by an error; the message says why
    interrupted  its process vanished (crash, kill, power cut); the last checkpoint survives
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


RUN_STATUSES: tuple[RunStatus, ...] = tuple(RunStatus)
FINISHED = frozenset({RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED, RunStatus.INTERRUPTED})
# Training can go on from the newest checkpoint (or from the start when none was saved).
RESUMABLE = frozenset({RunStatus.STOPPED, RunStatus.FAILED, RunStatus.INTERRUPTED})
# An adapter may exist: the final one (completed) or the newest checkpoint (the others). Whether the
# files are there is for `engine export` to find out; a run still training or never begun has none to give.
EXPORTABLE = frozenset({RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED, RunStatus.INTERRUPTED})


def parse_status(value: str | RunStatus | None) -> RunStatus | None:
    """The member for a stored string; None for anything else (an app-only state such as 'starting')."""
    if value is None:
        return None  # as RunStatus(None) would fail
    try:
        return RunStatus(value)
    except ValueError:
        return None


def is_finished(status: str | RunStatus | None) -> bool:
    """No process is training the run any more (it may still be resumable)."""
    return parse_status(status) in FINISHED


def is_resumable(status: str | RunStatus | None) -> bool:
    return parse_status(status) in RESUMABLE


def is_exportable(status: str | RunStatus | None) -> bool:
    return parse_status(status) in EXPORTABLE


def resume_refusal(status: str | RunStatus | None) -> str:
    """Why a run in ``status`` cannot be resumed ('' when it can)."""
    if is_resumable(status):
        return ""
    if status == RunStatus.COMPLETED:
        return "it already completed; start a new run from its config"
    if status == RunStatus.RUNNING:
        return "it is still running"
    if status == RunStatus.CREATED:
        return "it never started; start a new run from its config"
    return f"its status is {status!r}"


def export_refusal(status: str | RunStatus | None) -> str:
    """Why a run in ``status`` has nothing to export ('' when it may)."""
    if is_exportable(status):
        return ""
    if status == RunStatus.RUNNING:
        return "it is still running; stop it first (a checkpoint is saved) or wait until it completes"
    if status == RunStatus.CREATED:
        return "it never started"
    return f"its status is {status!r}"
