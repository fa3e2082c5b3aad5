"""Adapter layers (PEFT's LoRA / DoRA) on a frozen base, and the optimizer over them."""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from finetune_studio.core.config import TrainConfig


def enable_checkpointing(base) -> None:
    """Recompute each decoder layer in backward (non-reentrant). transformers 5.24 renamed
    ``gradient_checkpointing_enable`` (now a deprecated alias) to ``activation_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_adapters(base, config: TrainConfig):
    """Wrap ``base`` with LoRA (or DoRA) on ``config.target_modules``; only adapter weights train.

    LoRA: ``W0 x + (alpha / r) * B A x`` with B = 0 at the start, so training starts from the base model.
    rsLoRA scales by ``alpha / sqrt(r)``. DoRA: ``m * (W0 + s B A) / ||W0 + s B A||_c``, the magnitude m trained.
    """
    from peft import get_peft_model

    lora = lora_config(config)
    if config.gradient_checkpointing:
        enable_checkpointing(base)
    try:
        model = get_peft_model(base, lora)
    except ValueError as exc:
        from finetune_studio.core.config import ConfigError

        raise ConfigError("target_modules", f"{exc}") from None
    return model


def lora_config(config: TrainConfig):
    """PEFT's LoraConfig for ``config`` (also used to count parameters on the meta device)."""
    from peft import LoraConfig

    targets = config.target_modules
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=cast(int, config.lora_alpha),  # peft annotates int; it scales by a float alpha as well
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        use_dora=config.uses_dora,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
        bias="none",
    )


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total); 4-bit packed weights counted as the parameters they hold."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or p.dtype == torch.uint8:
            n *= 2  # two 4-bit values per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def make_optimizer(params, config: TrainConfig, device: str):
    """AdamW (8 bytes of state per trainable parameter), 8-bit AdamW (2 bytes), or paged variants."""
    params = [p for p in params if p.requires_grad]
    kw: dict[str, Any] = {
        "lr": config.learning_rate,
        "weight_decay": config.weight_decay,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
    }
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, fused=device == "cuda", **kw)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[config.optimizer]
    return cls(params, **kw)


def lr_lambda(config: TrainConfig, total_steps: int):
    """Multiplier of the peak learning rate at step s: linear warm-up, then linear / cosine decay to 0."""
    warmup = config.warmup_steps

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
