"""Checks before a run loads its weights: a LoRA rank the model cannot use, a run the memory estimate (fitted to
its data) says cannot fit. Refusing at once, with the setting to change, beats being ended by the system's
out-of-memory killer half an hour later (which leaves no ``failed`` event behind)."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.memory.estimate import ModelShape, rank_limit
from finetune_studio.core.protocol.memory_report import MemoryReport

log = logging.getLogger(__name__)


class MemoryGuardError(RuntimeError):
    """The estimate says the run cannot fit; the message names what to change and how to start anyway."""


def check_rank(config: TrainConfig, model_folder: str | Path) -> None:
    """A ConfigError when ``lora_rank`` is above the width of the layers it adapts (checked before any loading)."""
    try:
        shape = ModelShape.from_model_dir(model_folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no rank check for this model: %s", exc)
        return
    limit = rank_limit(shape, config)
    if limit and config.lora_rank > limit:
        raise ConfigError(
            "lora_rank",
            f"{config.lora_rank} is above the width of the layers it adapts (at most {limit} for this model): "
            f"choose {limit} or less (8 to 64 is typical)",
        )


def check_fit(report: MemoryReport | None, config: TrainConfig) -> str:
    """Raise MemoryGuardError when the run's estimate (fitted to its data, before the weights load) says it cannot
    fit, unless ``ignore_memory_check``; returns the estimate's sentence ("" when there is none)."""
    if report is None:
        return ""
    if report.verdict == "does not fit" and not config.ignore_memory_check:
        change = f" {report.cheapest_change[:1].upper()}{report.cheapest_change[1:]}." if report.cheapest_change else ""
        raise MemoryGuardError(
            f"Not started: {report.message}.{change} Change that setting, or set ignore_memory_check to true to "
            "start anyway (the system may then end the run)"
        )
    return report.message
