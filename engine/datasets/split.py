"""Seeded train/validation split by prompt: no prompt appears on both sides."""

from __future__ import annotations

import hashlib


def split_by_prompt(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Return (train, validation). Examples sharing a ``prompt_key`` land on the same side.

    About ``fraction`` of the distinct prompts go to validation (at least one, and never all of them, so training
    keeps data); which ones depends only on ``seed`` and the prompts, not on the order of the rows. Both sides keep
    the input order.
    """
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    keys = sorted(
        {ex.prompt_key for ex in examples}, key=lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).hexdigest()
    )
    n_val = min(max(1, round(len(keys) * fraction)), len(keys) - 1) if len(keys) > 1 else 0
    val_keys = set(keys[:n_val])
    train = [ex for ex in examples if ex.prompt_key not in val_keys]
    val = [ex for ex in examples if ex.prompt_key in val_keys]
    return train, val
