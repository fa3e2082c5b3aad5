"""The engine's two logs: the run log a person reads, and the full log kept with the run.

- The run log goes to stderr, which the app shows live beside the curves. It carries the engine's own messages
  (loggers under ``finetune_studio``) and errors from anyone: what a person can act on.
- The full log, ``<run_dir>/engine.log``, carries everything: library warnings and notices as well (a
  bitsandbytes kernel it could not load, a transformers deprecation), with Python warnings routed into logging.
  Records from before the run has a folder (model conversion, imports) are buffered and written there first.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = "finetune_studio"

_run_log: logging.Handler | None = None
_early: logging.handlers.MemoryHandler | None = None


class RunLogFilter(logging.Filter):
    """What belongs in the log a person reads: the engine's own records and any error."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGERS or record.name.startswith(OWN_LOGGERS + ".")
        return own or record.levelno >= logging.ERROR


def setup() -> None:
    """Route every record: the engine's own and errors to stderr, everything to the (future) full log."""
    global _run_log, _early
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    _run_log = logging.StreamHandler(sys.stderr)
    _run_log.setFormatter(logging.Formatter(FORMAT))
    _run_log.addFilter(RunLogFilter())
    root.addHandler(_run_log)
    _early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    root.addHandler(_early)
    logging.captureWarnings(True)  # warnings.warn(...) from libraries -> logger "py.warnings" -> full log only
    # transformers writes to stderr through a handler of its own and stops its records there: route them here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def attach_run_dir(run_dir: Path) -> None:
    """Start the full log in ``run_dir/engine.log``, beginning with what was buffered so far."""
    global _early
    root = logging.getLogger()
    if _early is None or _early not in root.handlers:
        return  # logging was not set up by the CLI (in-process callers keep their own logging)
    full = logging.FileHandler(Path(run_dir) / "engine.log", encoding="utf-8")
    full.setFormatter(logging.Formatter(FORMAT))
    _early.setTarget(full)
    _early.flush()
    root.removeHandler(_early)
    _early.close()
    _early = None
    root.addHandler(full)


def stop_run_log() -> None:
    """The reader of stderr is gone (the app let the run go on without it): the full log alone remains."""
    if _run_log is not None:
        logging.getLogger().removeHandler(_run_log)
