"""Turning exceptions into ``failed`` events a person can act on."""

from __future__ import annotations

import sqlite3

from finetune_studio.core import paths
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.db_recovery import DatabaseDamaged
from finetune_studio.core.protocol.events import FailureKind


class DataError(ValueError):
    """The dataset cannot be trained on with this config; the message says what to change."""


# What allocators say when memory runs out: CUDA and MPS ("out of memory"), torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory ... Error code 12 (Cannot allocate memory)").
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    text = str(exc).lower()
    return name in ("OutOfMemoryError", "MemoryError") or any(t in text for t in _OOM_TEXT)


def oom_message(config: TrainConfig | None, step: int) -> str:
    where = f" at step {step}" if step else " while loading or on the first step"
    if config is None:
        return f"Out of memory{where}. Lower batch_size or max_length, or choose a smaller model."
    tips = []
    if config.batch_size > 1:
        tips.append(
            f"lower batch_size (now {config.batch_size}; try {max(1, config.batch_size // 2)} and raise "
            f"gradient_accumulation_steps to keep the effective batch)"
        )
    tips.append(f"lower max_length (now {config.max_length})")
    if not config.gradient_checkpointing:
        tips.append("turn on gradient_checkpointing")
    if not config.quantized:
        tips.append("use QLoRA (method: qlora) to store the base in 4 bits")
    if config.optimizer == "adamw":
        tips.append("use the 8-bit AdamW optimizer")
    return f"Out of memory{where}. To fit: " + "; ".join(tips) + "."


def classify(exc: BaseException, config: TrainConfig | None, step: int) -> tuple[FailureKind, str]:
    """(kind, message) for a ``failed`` event."""
    from finetune_studio.engine.datasets.render import RenderError
    from finetune_studio.engine.datasets.schema import DatasetError
    from finetune_studio.engine.models import ModelError
    from finetune_studio.engine.train.guard import MemoryGuardError

    if isinstance(exc, ConfigError):
        return FailureKind.CONFIG, f"Invalid config: {exc}"
    if isinstance(exc, (DatasetError, DataError, RenderError)):
        return FailureKind.DATA, f"Dataset problem: {exc}"
    if isinstance(exc, DatabaseDamaged):
        return FailureKind.DATABASE, f"Database problem: {exc}"
    if type(exc) is sqlite3.DatabaseError:  # damage found mid-run
        return FailureKind.DATABASE, f"Database problem: {DatabaseDamaged(paths.db_path(), str(exc))}"
    if isinstance(exc, MemoryGuardError):
        return FailureKind.OOM, str(exc)
    if isinstance(exc, ModelError):
        return FailureKind.MODEL, f"Model problem: {exc}"
    if isinstance(exc, FileNotFoundError):
        return FailureKind.DATA, f"File not found: {exc.filename or exc}"
    if is_out_of_memory(exc):
        return FailureKind.OOM, oom_message(config, step)
    return FailureKind.ERROR, f"Training failed{f' at step {step}' if step else ''}: {type(exc).__name__}: {exc}"
