"""Supervised fine-tuning: the cross-entropy of the trained tokens (the answers, or all the text)."""

from __future__ import annotations

import torch

from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.losses import sft_loss
from finetune_studio.engine.train.objectives.base import Objective


class SFT(Objective):
    """The mean ``-log p`` of every trained token of the step (accumulation gives the gradient of one big batch)."""

    name = "sft"
    data_kinds = ("sft", "text")

    def denominator(self, batch: Batch) -> int:
        return batch.trained_tokens

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        return sft_loss(self.trained.logps(batch).logps, denom), {}

    def eval_sums(self, batch: Batch) -> dict[str, float]:
        out = self.trained.logps(batch)
        return {"loss": -out.logps.sum().item(), "count": out.logps.numel()}
