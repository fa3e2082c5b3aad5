"""Each trainable method's adapters on a frozen base: one module per family, one entry point.

``build(base, config)`` wraps ``base`` with ``config.method``'s adapters and leaves only them trainable;
``param_groups(model, config)`` is what the optimizer trains (LoRA+ gives LoRA's B matrices their own learning
rate). What each method is and allows (packing, DPO, merging, a 4-bit base, several processes) is the pure-Python
table :mod:`core.methods`, which the config checks before anything loads.

- :mod:`.lora`: PEFT's LoRA / DoRA (on a 16-bit or 4-bit base), with PiSSA, OLoRA and LoftQ initialisation and LoRA+;
- :mod:`.peft_methods`: PEFT's VeRA, IA3, bias tuning (BEFT) and the prompt-learning methods (prompt tuning,
  P-tuning, prefix tuning);
- bottleneck adapters (Houlsby, Pfeiffer) are written here, in :mod:`engine.bottleneck` (shared with generation and
  export, which load them).
- :mod:`.full`: no adapter, every weight trained (``method: full``), with the PEFT model's interface.

May import what the rest of ``train`` may (import-linter: "The engine is layered").
"""

from __future__ import annotations

from typing import Any

from finetune_studio.core import methods as table
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.engine import bottleneck
from finetune_studio.engine.train.methods import full, lora, peft_methods


def build(base: Any, config: TrainConfig) -> Any:
    """``base`` with ``config.method``'s fresh adapters; only they train. A target the model lacks is a
    ConfigError naming ``target_modules``."""
    family = table.method(config.method).family
    if family == "full":
        return full.build(base, config)
    if family == "bottleneck":
        return bottleneck.add_bottlenecks(base, bottleneck_config(config))
    peft_config = lora.lora_config(config) if table.method(config.method).peft_lora else peft_methods.config_for(config)
    from peft import get_peft_model

    try:
        model = get_peft_model(base, peft_config)
    except ValueError as exc:
        raise ConfigError("target_modules", f"{exc}") from None
    if config.method in ("lora", "qlora") and config.lora_init == "loftq":
        lora.apply_loftq(model)
    return model


def bottleneck_config(config: TrainConfig) -> bottleneck.BottleneckConfig:
    return bottleneck.BottleneckConfig(
        placement=config.method,
        reduction_factor=config.adapter_reduction_factor,
        non_linearity=config.adapter_non_linearity,
    )


def param_groups(params: list, model: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one at the learning rate, and with LoRA+ (``loraplus_lr_ratio`` above 1)
    LoRA's B matrices in a second at ratio x the learning rate."""
    if config.loraplus_lr_ratio == 1:
        return [{"params": params}]
    return lora.loraplus_groups(params, model, config)
