"""PEFT's LoRA family: LoRA and DoRA on a 16-bit or 4-bit base, their initialisations, and LoRA+.

LoRA: ``W0 x + (alpha / r) * B A x``; B = 0 at the start (``lora_init: default``), so training starts from the base.
rsLoRA scales by ``alpha / sqrt(r)``. DoRA: ``m * (W0 + s B A) / ||W0 + s B A||_c``, the magnitude m trained.

- PiSSA: A and B start as the top-r singular vectors of W0 (``B A = U_r S_r V_r^T``) and the base keeps the rest,
  ``W0 - s B A``; OLoRA starts them from a QR decomposition of W0 the same way. The model at step 0 is the base;
  the adapter saved at the end is converted to plain LoRA against the original base (rank 2r: ``[B, -B0] [A; A0]``),
  so generation and export load it on the unchanged base.
- LoftQ (a 4-bit base): A and B start as the best rank-r correction of the 4-bit rounding, ``W0 - Q(W0)``
  (PEFT's ``replace_lora_weights_loftq``, one alternating step), so the model at step 0 is closer to the 16-bit one.
- LoRA+: B learns ``loraplus_lr_ratio`` times faster than A (Hayou et al., 2024), its own optimizer group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from finetune_studio.core.config import TrainConfig

# lora_init -> PEFT's init_lora_weights (LoftQ is applied after wrapping, on the loaded 4-bit base)
_PEFT_INIT: dict[str, Any] = {"default": True, "pissa": "pissa", "olora": "olora", "loftq": True}


def lora_config(config: TrainConfig) -> Any:
    """PEFT's LoraConfig for ``config`` (also used to count parameters on the meta device)."""
    from peft import LoraConfig

    targets = config.target_modules
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=cast(int, config.lora_alpha),  # peft annotates int; it scales by a float alpha as well
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        use_dora=config.uses_dora,
        init_lora_weights=_PEFT_INIT[config.lora_init],
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
        bias="none",
    )


def apply_loftq(model: Any) -> None:
    """LoftQ on a model whose base was loaded in 4 bits: each LoRA pair replaced by the rank-r correction of its
    layer's rounding, computed from the original weights in the model's folder."""
    from peft import replace_lora_weights_loftq

    folder = Path(str(getattr(model.get_base_model().config, "_name_or_path", "")))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if len(files) != 1:
        from finetune_studio.core.config import ConfigError

        raise ConfigError(
            "lora_init",
            f"LoftQ reads the 16-bit weights from the model's one safetensors file; {folder} has {len(files)}",
        )
    replace_lora_weights_loftq(model, model_path=str(files[0]))


def loraplus_groups(params: list, model: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """[A matrices and the rest at the learning rate, B matrices at ``loraplus_lr_ratio`` x it]."""
    fast_ids = {id(p) for name, p in model.named_parameters() if ".lora_B." in name and p.requires_grad}
    slow = [p for p in params if id(p) not in fast_ids]
    fast = [p for p in params if id(p) in fast_ids]
    return [
        {"params": slow},
        {"params": fast, "lr": config.learning_rate * config.loraplus_lr_ratio},
    ]


def converts_on_save(config: TrainConfig) -> bool:
    """PiSSA and OLoRA rewrite the base: their final adapter is saved converted to LoRA on the original base."""
    return config.lora_init in ("pissa", "olora")
