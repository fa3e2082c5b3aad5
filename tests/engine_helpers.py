"""Small data files and configs for engine tests."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from finetune_studio.core.config import TrainConfig


def write_sft(path: Path, n: int = 40) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"The answer is {2 * i}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def write_dpo(path: Path, n: int = 40) -> Path:
    rows = [
        {"prompt": f"Give the number {i} in JSON.", "chosen": f'{{"n": {i}}}', "rejected": f"The number is {i}."}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def tiny_config(model_dir: Path, dataset: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        dataset=str(dataset),
        max_steps=6,
        batch_size=4,
        learning_rate=1e-2,
        eval_every=0,
        checkpoint_every=0,
        lora_rank=8,
        lora_alpha=16,
        validation_fraction=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    """An in-process event listener."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.type == kind]

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.of("step")]


def micro_step_loss(model, objective: str, batch, policy=contextlib.nullcontext):
    """The engine's loss for one micro-batch as ``Recipe._micro_step`` computes it, before backward: SFT's mean
    over trained tokens, or DPO's mean over pairs with the reference pass (adapters off, no graph) first.
    ``policy()`` is entered around the part that builds the graph (a saved-tensor census, say)."""
    import torch

    from finetune_studio.engine.train.forward import LogprobModel
    from finetune_studio.engine.train.losses import dpo_loss, sequence_logps, sft_loss

    logps = LogprobModel(model)
    if objective == "sft":
        with policy():
            return sft_loss(logps(batch).logps, batch.trained_tokens)

    def pair():
        out = logps(batch)
        seq = sequence_logps(out.logps, out.rows, out.batch)
        return seq[: batch.pairs], seq[batch.pairs :]

    with torch.no_grad(), model.disable_adapter():
        ref_c, ref_r = pair()
    with policy():
        pol_c, pol_r = pair()
        losses, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
        return losses.sum() / batch.pairs
