"""Checks before a run loads anything heavy: a LoRA rank the model cannot use, a run the memory estimate says
cannot fit. Refusing at once, with the setting to change, beats being ended by the system's out-of-memory killer
half an hour later (which leaves no ``failed`` event behind)."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory import ModelShape, estimate_training_memory, fits, rank_limit

log = logging.getLogger(__name__)


class MemoryGuardError(RuntimeError):
    """The estimate says the run cannot fit; the message names what to change and how to start anyway."""


def device_memory(device: str) -> DeviceInfo:
    """Total and free memory of the device the run will use, as the engine sees it now."""
    import psutil
    import torch

    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), total, free, torch.cuda.is_bf16_supported())
    vm = psutil.virtual_memory()
    return DeviceInfo("mps" if device == "mps" else "cpu", device, vm.total, vm.available, device == "mps")


def check_before_start(config: TrainConfig, model_folder: str | Path, device: str) -> str:
    """Raise ConfigError (a rank above the layers' width) or MemoryGuardError (will not fit, unless
    ``ignore_memory_check``); returns the estimate's sentence ("" when the model's shape is unknown)."""
    try:
        shape = ModelShape.from_model_dir(model_folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no memory check for this model: %s", exc)
        return ""
    limit = rank_limit(shape, config)
    if limit and config.lora_rank > limit:
        raise ConfigError(
            "lora_rank",
            f"{config.lora_rank} is above the width of the layers it adapts (at most {limit} for this model): "
            f"choose {limit} or less (8 to 64 is typical)",
        )
    info = device_memory(device)
    verdict = fits(estimate_training_memory(shape, config, info), info, headroom=0.0, config=config)
    if not verdict.fits and not config.ignore_memory_check:
        raise MemoryGuardError(
            f"Not started: {verdict.message}. Change that setting, or set ignore_memory_check to true to start "
            "anyway (the system may then end the run)"
        )
    return verdict.message
