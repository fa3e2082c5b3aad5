"""The export's errors, shared by the writer and every form it writes (gguf, ollama, the check)."""

from __future__ import annotations


class ExportError(ValueError):
    """The export cannot be made; the message says why."""


class ExportCancelled(ExportError):
    """The person cancelled; nothing was left behind."""
