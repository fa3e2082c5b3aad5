"""Proximal Policy Optimisation with a value head: the RLHF of InstructGPT, on the answers the policy samples.

Built on :class:`~engine.train.objectives.grpo.GRPO`: the same prompts (SFT conversations), sampling with the
engine's decode loop (``ppo_samples_per_prompt`` answers to each prompt, up to ``ppo_max_new_tokens``, at
``ppo_temperature``), the same rewards (``TrainConfig.rewards``: verifiers, a reward model, sandboxed Python), the
same ``rollouts`` events, evaluation (the greedy answers' ``eval_reward``) and sampler state in checkpoints. What
differs is where the advantage comes from (Ouyang et al. 2022; Ziegler et al. 2019; TRL's ``PPOTrainer``):

* **per-token rewards**: each answer token gets ``-ppo_kl_coef * (log pi_old - log pi_ref)``, the KL penalty to
  the reference (the model training started from: the bare base, or the starting adapter's frozen copy), and the
  answer's last token its score (:func:`engine.train.losses.ppo_token_rewards`);
* **a value head**: a float32 ``Linear(hidden, 1)`` on the policy's last hidden state (after the final norm) at
  each position that predicts an answer token, ``V_t`` the expected return from there; it starts at zero, trains
  with the adapter (its gradient reaches the adapter too: one shared trunk, as TRL's old value-head models), is
  written into every checkpoint and saved beside the adapter (:data:`VALUE_HEAD_WEIGHTS`, :data:`VALUE_HEAD_INFO`);
  a run started from a PPO run's adapter (``init_adapter``) starts from its value head too;
* **advantages by GAE** (``ppo_gamma``, ``ppo_lambda``) over each answer's tokens, with returns ``A + V``
  (:func:`engine.train.losses.gae_advantages`), the advantages whitened over the step's answer tokens;
* **the loss**: per answer token the clipped policy loss (``ppo_cliprange``) plus ``ppo_vf_coef`` times the
  clipped value loss (``ppo_cliprange_value``), averaged over the step's answer tokens
  (:func:`engine.train.losses.ppo_token_losses`), for ``ppo_epochs`` optimizer steps on each batch of answers.

The log-probs and the values come from one pass of the decoder: its hidden states at the answer positions feed the
output head (in float32 on a CPU under bf16 autocast, as ``engine.train.forward`` does) and the value head. The
sampling policy's log-probs and values and the reference's log-probs are taken once per batch of answers, with
the model in eval mode and no gradient.

Each step's figures (``Step.metrics``): ``reward`` (the mean score), ``reward/<name>``, ``kl`` (per answer token,
``log pi_old - log pi_ref`` of the sampled tokens; 0 with ``ppo_kl_coef`` 0, which skips the reference pass),
``policy_loss`` and ``value_loss`` (per token), ``value`` (the value head's mean prediction),
``explained_variance`` (``1 - Var(R - V_old) / Var(R)`` over the step's tokens; left out when the returns do not
vary), ``clip_fraction`` and ``value_clip_fraction`` (tokens where the clip decided the loss) and
``completion_length``. A rollout item's ``advantage`` is the mean of its tokens' whitened advantages.

One process only (the value head and the decoder's hidden states do not go through the DDP / FSDP wrapper), and
only methods whose output head stays a plain linear layer (not ``lm_head`` in ``target_modules``).
"""

from __future__ import annotations

import contextlib
import json
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core import paths
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.engine import reward_model as rm
from finetune_studio.engine.datasets.render import IGNORE
from finetune_studio.engine.train import init_adapter
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.forward import LogprobModel
from finetune_studio.engine.train.losses import (
    gae_advantages,
    ppo_token_losses,
    ppo_token_rewards,
    sequence_logps,
    whiten,
)
from finetune_studio.engine.train.objectives.base import TrainedModel
from finetune_studio.engine.train.objectives.grpo import GRPO, RolloutBatch, Sampling

VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_INFO = "value_head.json"
VALUE_HEAD_FORMAT = "finetune-studio value head"
VALUE_HEAD_VERSION = 1


@dataclass(frozen=True)
class ValueHeadInfo:
    """``value_head.json``: what a PPO run's value head reads and what its output means."""

    hidden_size: int
    base_model: str  # the run's model spec
    meaning: str = (
        "the head's scalar at a position of prompt + answer that predicts an answer token: the return expected from "
        "there on (the answer's reward, minus the KL penalty to the reference of the tokens still to come)"
    )
    format: str = VALUE_HEAD_FORMAT
    version: int = VALUE_HEAD_VERSION


def new_value_head(hidden_size: int, device: str | torch.device = "cpu") -> torch.nn.Linear:
    """A value head, Linear(hidden, 1) in float32, all zeros: every value starts at 0, so the first advantages
    are the rewards' own."""
    head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head.to(device)


def save_value_head(head: torch.nn.Linear, folder: Path, info: ValueHeadInfo) -> None:
    """Write :data:`VALUE_HEAD_WEIGHTS` and :data:`VALUE_HEAD_INFO` into ``folder`` (a folder being written and
    renamed into place by its caller; the description through a temporary file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / VALUE_HEAD_WEIGHTS), metadata={"format": VALUE_HEAD_FORMAT})
    paths.atomic_write_text(folder / VALUE_HEAD_INFO, json.dumps(asdict(info), indent=2) + "\n")


def load_value_head(folder: Path, head: torch.nn.Linear) -> None:
    """``folder``'s value head weights into ``head`` (same hidden size), in place; ConfigError when they differ."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / VALUE_HEAD_WEIGHTS))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        raise ConfigError(
            "init_adapter", f"{folder}'s value head holds {found}, but this model's needs {expected}: another model"
        )
    with torch.no_grad():
        for name, param in head.named_parameters():
            param.copy_(weights[name].to(param.device))


@dataclass
class PPORolloutBatch(RolloutBatch):
    """Sampled answers with what PPO's loss needs per answer token: ``advantages`` (GAE, whitened over the step),
    ``old_logps`` (the sampling policy's), ``ref_logps`` (the reference's; None without a KL penalty) and these."""

    old_values: torch.Tensor | None = None  # [answer tokens] the value head's at sampling time
    returns: torch.Tensor | None = None  # [answer tokens] advantages + old values (before whitening)


class PPO(GRPO):
    """PPO with a value head on the recipe's seam (see the module): GRPO's sampling, its own advantages and loss."""

    name = "ppo"
    rollout_type = PPORolloutBatch

    @classmethod
    def sampling(cls, config: TrainConfig) -> Sampling:
        return Sampling(config.ppo_samples_per_prompt, config.ppo_max_new_tokens, config.ppo_temperature)

    def updates_per_batch(self) -> int:
        return self.trained.config.ppo_epochs

    def __init__(self, trained: TrainedModel) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ConfigError("objective", "PPO trains in one process here: run it without --nproc")
        super().__init__(trained)
        self.forward = LogprobModel(trained.model, kernels=trained.config.kernels)
        if not self.forward.fused:
            raise ConfigError(
                "target_modules",
                "PPO reads the policy's hidden states for its value head and its output head, which must stay a "
                "plain linear layer: leave lm_head out",
            )
        hidden = int(self.forward.causal_lm.config.hidden_size)
        self.value_head = new_value_head(hidden, trained.device)
        start = trained.start
        if start is not None and (Path(start.path) / VALUE_HEAD_WEIGHTS).is_file():
            load_value_head(Path(start.path), self.value_head)  # a PPO run goes on training, value head and all

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        return {"value_head": self.value_head}

    # --- the forward: log-probs and values from one pass ------------------------------------------------------------
    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([N] log-probs of the answer tokens, [N] float32 values of the positions that predict them, [N] each
        token's answer), from one pass of the decoder."""
        hidden, targets = self.forward.trained_hidden(batch)  # [N, H], [N]
        logps = self.forward.head_logps(hidden, targets)
        return logps, rm.head_rewards(self.value_head, hidden), token_rows(batch)

    def _no_grad_pass(self, batch: Batch, *, reference: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`tokens` in eval mode without a gradient, on the CPU: the policy as it is (the sampling policy's
        log-probs and values), or the reference (its log-probs; its values unused)."""
        model = self.trained.model
        training = model.training
        model.eval()
        context: AbstractContextManager[Any] = contextlib.nullcontext()
        if reference:
            context = init_adapter.reference_adapter(model) if self.trained.start else model.disable_adapter()
        try:
            with torch.no_grad(), context, self.trained.autocast():
                logps, values, rows = self.tokens(batch)
            return logps.float().cpu(), values.float().cpu(), rows.cpu()
        finally:
            model.train(training)

    # --- the step's batches: sampled answers, their token rewards, values and advantages --------------------------
    def sample(self, indices: list[int], first_group: int = 0) -> tuple[RolloutBatch, list[dict[str, Any]]]:
        """The answers to ``indices``' prompts, scored, with the sampling policy's log-probs and values, the
        reference's log-probs, GAE's advantages (whitened later, over the step: :meth:`sample_step`) and returns."""
        cfg = self.trained.config
        answered = self.answer(indices)
        laid = answered.laid
        on_device = laid.to(self.trained.device)
        old_logps, old_values, rows = self._no_grad_pass(on_device, reference=False)
        ref = self._no_grad_pass(on_device, reference=True)[0] if cfg.ppo_kl_coef > 0 else None
        rewards = ppo_token_rewards(answered.total, old_logps, ref, rows, kl_coef=cfg.ppo_kl_coef)
        advantages, returns = gae_advantages(rewards, old_values, rows, gamma=cfg.ppo_gamma, lam=cfg.ppo_lambda)
        residual = returns - old_values
        stats = {
            **answered.stats(),
            "kl": float((old_logps - ref).sum()) if ref is not None else 0.0,
            "returns": float(returns.sum()),
            "returns_sq": float((returns**2).sum()),
            "residual": float(residual.sum()),
            "residual_sq": float((residual**2).sum()),
        }
        rollout = PPORolloutBatch(
            laid.input_ids,
            laid.attention_mask,
            laid.labels,
            indices=laid.indices,
            position_ids=laid.position_ids,
            advantages=advantages,
            old_logps=old_logps,
            ref_logps=ref,
            stats=stats,
            old_values=old_values,
            returns=returns,
        )
        return rollout, answered.items([0.0] * len(answered.texts), first_group)

    def sample_step(self, groups: list[list[int]]) -> tuple[list[RolloutBatch], list[dict[str, Any]]]:
        """GRPO's, then the advantages whitened over every answer token of the step; each rollout item's
        advantage is the mean of its answer's."""
        kept, items = super().sample_step(groups)
        flat = whiten(torch.cat([_need(b.advantages) for b in kept]))
        start, answer = 0, 0
        for b in kept:
            n = _need(b.advantages).numel()
            b.advantages = flat[start : start + n].clone()  # its own storage: a checkpoint saves it alone
            start += n
            means = sequence_logps(b.advantages, token_rows(b), b.sequences, average=True)
            for value in means.tolist():
                items[answer]["advantage"] = value
                answer += 1
        return kept, items

    # --- the loss ---------------------------------------------------------------------------------------------------
    def denominator(self, batch: Batch) -> int:
        return batch.trained_tokens  # the step's answer tokens: every token counts alike, as TRL's masked means

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(batch, PPORolloutBatch) or batch.returns is None:
            raise TypeError("PPO trains on the batches it samples (step_batches)")
        cfg = self.trained.config
        logps, values, _rows = self.tokens(batch)
        policy, value, clipped, value_clipped = ppo_token_losses(
            logps,
            _need(batch.old_logps),
            _need(batch.advantages),
            values,
            _need(batch.old_values),
            batch.returns,
            cliprange=cfg.ppo_cliprange,
            cliprange_value=cfg.ppo_cliprange_value,
        )
        loss = (policy + cfg.ppo_vf_coef * value).sum() / denom
        sums = {
            "tokens": float(logps.numel()),
            "policy_loss": policy.sum().item(),
            "value_loss": value.sum().item(),
            "value": values.detach().sum().item(),
            "clipped": clipped.float().sum().item(),
            "value_clipped": value_clipped.float().sum().item(),
        }
        return loss, {**sums, **batch.stats}

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        answers, tokens = max(sums.get("answers", 0.0), 1.0), max(sums.get("tokens", 0.0), 1.0)
        out = {
            "reward": sums.get("reward", 0.0) / answers,
            "kl": sums.get("kl", 0.0) / tokens,
            "policy_loss": sums.get("policy_loss", 0.0) / tokens,
            "value_loss": sums.get("value_loss", 0.0) / tokens,
            "value": sums.get("value", 0.0) / tokens,
            "clip_fraction": sums.get("clipped", 0.0) / tokens,
            "value_clip_fraction": sums.get("value_clipped", 0.0) / tokens,
            "completion_length": sums.get("length", 0.0) / answers,
        }
        var_returns = sums.get("returns_sq", 0.0) / tokens - (sums.get("returns", 0.0) / tokens) ** 2
        var_residual = sums.get("residual_sq", 0.0) / tokens - (sums.get("residual", 0.0) / tokens) ** 2
        if var_returns > 1e-12:
            out["explained_variance"] = 1.0 - var_residual / var_returns
        out.update({k: v / answers for k, v in sums.items() if k.startswith("reward/")})
        return out

    # --- checkpoints and the saved adapter --------------------------------------------------------------------------
    def save_state(self, folder: Path, *, final: bool) -> None:
        """GRPO's sampler state (in a checkpoint), and the value head: in every checkpoint and beside the adapter."""
        super().save_state(folder, final=final)
        info = ValueHeadInfo(hidden_size=self.value_head.in_features, base_model=self.trained.config.model)
        save_value_head(self.value_head, folder, info)

    def load_state(self, folder: Path) -> None:
        super().load_state(folder)
        if (Path(folder) / VALUE_HEAD_WEIGHTS).is_file():
            load_value_head(Path(folder), self.value_head)


def token_rows(batch: Batch) -> torch.Tensor:
    """[N] the sequence of each trained token, in the order the training forward returns them."""
    mask = batch.labels[:, 1:] != IGNORE
    if batch.packed:
        return batch.sequence_index[:, :-1][mask]
    return mask.nonzero()[:, 0]


def _need(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise TypeError("PPO's batches carry their sampling-time tensors (PPO.sample)")
    return t
