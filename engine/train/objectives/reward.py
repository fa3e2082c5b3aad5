"""A reward model: the base with a LoRA adapter and a scalar head, trained so the chosen answer out-scores the
rejected one.

The reward of an answer is the head (a float32 Linear(hidden, 1), ``engine.reward_model``) applied to the
decoder's last hidden state at the last token of the chat-rendered prompt + answer. The loss per pair is
Bradley-Terry's ``-log sigmoid(r_chosen - r_rejected - margin)`` (``engine.train.losses.reward_loss``;
``reward_margin`` from the config: pairs carry no strength of their own). No reference model and no logits: the
output head is never run.

The head is the objective's own module (:meth:`Reward.extra_modules`): the optimizer trains it with the adapter,
and it is written into every checkpoint and into the final (and best) adapter folder with its description and a
card (:meth:`Reward.save_state`), so the run's ``adapter/`` is a reward model ``RewardModel.load`` reads. Started
from a reward model's folder (``init_adapter``), the head starts from that model's head too.

One process only: the head and the decoder's hidden states do not go through the DDP / FSDP wrapper.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune_studio.core.config import ConfigError
from finetune_studio.engine import reward_model as rm
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.forward import packed_inputs
from finetune_studio.engine.train.losses import reward_loss
from finetune_studio.engine.train.model_patches.fused_ops import split_packed_rows
from finetune_studio.engine.train.objectives.base import Objective, TrainedModel


class Reward(Objective):
    """Per-pair Bradley-Terry losses averaged over the step's pairs; reward accuracy and the reward gap."""

    name = "reward"
    data_kinds = ("preference",)

    def __init__(self, trained: TrainedModel) -> None:
        super().__init__(trained)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ConfigError("objective", "a reward model trains on one process: run it without --nproc")
        peft_config = getattr(trained.model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ConfigError(
                "method",
                f"{trained.config.method} trains virtual tokens in front of the input, which the reward model's "
                "hidden states never see: choose a method that adapts the layers (LoRA, DoRA, IA3, bottleneck...)",
            )
        self.decoder = rm.decoder_of(trained.model)
        self.head = rm.new_head(int(self.decoder.config.hidden_size), trained.config.seed, trained.device)
        start = trained.start
        if start is not None and rm.is_reward_model(start.path):
            rm.load_head_weights(start.path, self.head)  # a reward model goes on training, head and all
        self.base_path = str(getattr(peft_config, "base_model_name_or_path", "") or "")

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        return {"reward_head": self.head}

    def rewards(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """([P] chosen, [P] rejected) float32 rewards of the batch's P pairs."""
        if batch.packed:  # one row: each sequence ends where the next starts
            with split_packed_rows(batch.sequence_lengths):
                hidden = self.decoder(input_ids=batch.input_ids, use_cache=False, **packed_inputs(batch))
            ends = torch.tensor(batch.sequence_lengths, device=batch.input_ids.device).cumsum(0) - 1
            selected = hidden.last_hidden_state[0, ends]  # [2P, H]
        else:
            hidden = self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
            selected = hidden.last_hidden_state[rows, rm.last_positions(batch.attention_mask)]  # [2P, H]
        rewards = rm.head_rewards(self.head, selected)  # [2P]
        return rewards[: batch.pairs], rewards[batch.pairs :]

    def denominator(self, batch: Batch) -> int:
        return batch.pairs

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.rewards(batch)
        losses = reward_loss(chosen, rejected, self.trained.config.reward_margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        return losses.sum() / denom, {
            "reward_chosen": chosen.sum().item(),
            "reward_rejected": rejected.sum().item(),
            "reward_accuracy": (chosen > rejected).float().sum().item(),
        }

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        chosen, rejected = sums["reward_chosen"] / denom, sums["reward_rejected"] / denom
        return {
            "reward_chosen": chosen,
            "reward_rejected": rejected,
            "reward_margin": chosen - rejected,  # the reward gap
            "reward_accuracy": sums["reward_accuracy"] / denom,
        }

    def eval_sums(self, batch: Batch) -> dict[str, float]:
        chosen, rejected = self.rewards(batch)
        losses = reward_loss(chosen, rejected, self.trained.config.reward_margin)
        return {
            "loss": losses.sum().item(),
            "count": batch.pairs,
            "margin": (chosen - rejected).sum().item(),
            "correct": (chosen > rejected).float().sum().item(),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Held-out pair accuracy and the mean reward gap (chosen minus rejected)."""
        return {"reward_margin": sums["margin"] / sums["count"], "reward_accuracy": sums["correct"] / sums["count"]}

    def save_state(self, folder: Path, *, final: bool) -> None:
        cfg = self.trained.config
        info = rm.HeadInfo(
            hidden_size=self.head.in_features,
            base_model=cfg.model,
            base_model_path=self.base_path,
            max_length=cfg.max_length,
            margin=cfg.reward_margin,
            method=cfg.method,
        )
        rm.save_head(self.head, folder, info)
        if final:
            rm.write_card(folder, info)

    def load_state(self, folder: Path) -> None:
        rm.load_head_weights(folder, self.head)
