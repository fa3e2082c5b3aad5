"""Direct Preference Optimisation: prefer the chosen answer over the rejected one, against a frozen reference.

The reference is the starting model: the bare base (adapters off), or the adapter the run started from, loaded a
second time as a frozen copy (``engine.train.init_adapter``), so that the loss starts at ln 2. Its log-probs are
computed once before training (``precompute_reference``) or in each step before the policy's, so that no policy
graph is alive during the reference pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from finetune_studio.engine.train import init_adapter
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.losses import dpo_loss, sequence_logps
from finetune_studio.engine.train.objectives.base import Objective, Progress, TrainedModel


class DPO(Objective):
    """Per-pair DPO losses (sigmoid, hinge or IPO), averaged over the step's pairs, and the implicit rewards."""

    name = "dpo"
    data_kinds = ("preference",)
    needs_reference = True

    def __init__(self, trained: TrainedModel) -> None:
        super().__init__(trained)
        self.precomputed: tuple[torch.Tensor, torch.Tensor] | None = None  # (chosen, rejected) by training example

    def prepare(self, examples: Sequence, batch: Callable[[list[int]], Batch], progress: Progress) -> None:
        """With ``precompute_reference``: the reference's log-probs of every training pair, once."""
        if not self.trained.config.precompute_reference:
            return
        n, bs = len(examples), self.trained.config.batch_size
        chosen, rejected = torch.zeros(n), torch.zeros(n)
        for start in range(0, n, bs):
            progress("reference", start, n, "Computing reference log-probs")
            idx = list(range(start, min(n, start + bs)))
            c, r = self.reference_logps(batch(idx))
            chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
        self.precomputed = (chosen, rejected)

    def denominator(self, batch: Batch) -> int:
        return batch.pairs

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        losses, rc, rr = self.terms(batch, self.precomputed)
        return losses.sum() / denom, {
            "reward_chosen": rc.sum().item(),
            "reward_rejected": rr.sum().item(),
            "reward_accuracy": (rc > rr).float().sum().item(),
        }

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        chosen, rejected = sums["reward_chosen"] / denom, sums["reward_rejected"] / denom
        return {
            "reward_chosen": chosen,
            "reward_rejected": rejected,
            "reward_margin": chosen - rejected,
            "reward_accuracy": sums["reward_accuracy"] / denom,
        }

    def eval_sums(self, batch: Batch) -> dict[str, float]:
        losses, rc, rr = self.terms(batch)  # held-out pairs: their reference computed here
        return {
            "loss": losses.sum().item(),
            "count": batch.pairs,
            "margin": (rc - rr).sum().item(),
            "correct": (rc > rr).float().sum().item(),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"reward_margin": sums["margin"] / sums["count"], "reward_accuracy": sums["correct"] / sums["count"]}

    def terms(self, batch: Batch, precomputed=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair DPO losses and rewards; the reference pass runs first, so no policy graph is alive then."""
        cfg = self.trained.config
        ref_c, ref_r = self.reference_logps(batch, precomputed)
        pol_c, pol_r = self.pair_logps(batch)
        return dpo_loss(
            pol_c,
            pol_r,
            ref_c,
            ref_r,
            beta=cfg.dpo_beta,
            loss_type=cfg.dpo_loss,
            label_smoothing=cfg.dpo_label_smoothing,
        )

    def pair_logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) sequence log-probs of the model as it is (length-averaged for IPO)."""
        out = self.trained.logps(batch)
        seq = sequence_logps(out.logps, out.rows, out.batch, average=self.trained.config.dpo_loss == "ipo")
        return seq[: batch.pairs], seq[batch.pairs :]

    def reference_logps(self, batch: Batch, precomputed=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the reference: the starting adapter (init_adapter) or the bare base (adapters off);
        ``precomputed`` (chosen, rejected) indexed by training example."""
        if precomputed is not None:
            idx = torch.tensor(batch.indices)
            device = self.trained.device
            return precomputed[0][idx].to(device), precomputed[1][idx].to(device)
        model = self.trained.model
        reference = init_adapter.reference_adapter(model) if self.trained.start else model.disable_adapter()
        with torch.no_grad(), reference, self.trained.autocast():
            return self.pair_logps(batch)
