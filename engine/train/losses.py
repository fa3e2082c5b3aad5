"""Training losses as pure functions.

Shapes: ``B`` sequences, ``N`` trained tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(token_logps: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the trained tokens: ``-sum(log p(y_t | y_<t)) / num_tokens``.

    token_logps: [N] log-probabilities of the target tokens. ``num_tokens`` is the number of trained
    tokens in the whole optimizer step (all accumulated micro-batches), so that accumulation gives the
    same gradient as one big batch.
    """
    return -token_logps.sum() / max(int(num_tokens), 1)


def sequence_logps(token_logps: torch.Tensor, rows: torch.Tensor, batch: int, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of token log-probs per sequence.

    token_logps: [N]; rows: [N] the sequence index of each token -> [B].
    """
    out = torch.zeros(batch, dtype=token_logps.dtype, device=token_logps.device)
    out = out.index_add(0, rows, token_logps)
    if average:
        counts = torch.zeros(batch, dtype=token_logps.dtype, device=token_logps.device)
        counts = counts.index_add(0, rows, torch.ones_like(token_logps))
        out = out / counts.clamp(min=1)
    return out


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation loss per pair, and the implicit rewards.

    All inputs are [B] sequence log-probs ``log pi(y|x)``. With
    ``h = (log pi(yw|x) - log ref(yw|x)) - (log pi(yl|x) - log ref(yl|x))``:

    * sigmoid (Rafailov et al. 2023, with conservative label smoothing eps):
      ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``
    * hinge (SLiC): ``max(0, 1 - beta * h)``
    * ipo (Azar et al. 2023, eq. 17): ``(h - 1 / (2 * beta))^2`` (use length-averaged log-probs)

    Rewards: ``beta * (log pi(y|x) - log ref(y|x))`` for chosen and rejected, detached.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair: ``-log sigmoid(r_chosen - r_rejected - margin)``.

    ``chosen``, ``rejected``: [B] scalar rewards of the two answers; ``margin``: a float or [B] (how far the chosen
    answer must lead before the loss lets go; 0 is the plain Bradley-Terry loss). Returns losses [B].
    """
    return -F.logsigmoid(chosen - rejected - margin)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward against its group's (``group_size`` consecutive answers to one prompt).

    rewards: [B * G] -> [B * G] ``(r - mean_group) / (std_group + eps)`` with the group's sample standard deviation
    (Bessel-corrected, as TRL's); ``scale`` False: ``r - mean_group`` (Dr. GRPO, Liu et al. 2025, no division).
    """
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def grpo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's loss per answer token (Shao et al. 2024, eq. 3), the KL estimate and where the clip is active.

    All inputs are [N] per answer token: the policy's ``log pi`` (with gradient), the sampling policy's
    ``log pi_old`` and the reference's ``log pi_ref`` (None: no KL term), and the advantage of the token's answer.
    With ``rho = exp(log pi - log pi_old)``:

    ``loss_t = -min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon) * A) + beta * KL_t`` and
    ``KL_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (the k3 estimator, unbiased and positive).

    Returns (losses [N], KL [N] detached (zeros without a reference), clipped [N] bool: the ratio left the clip
    range in the direction the advantage pushes it, so the token gives no gradient).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    losses = -torch.min(unclipped, clipped_ratio * advantages)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * kl
        kl = kl.detach()
    else:
        kl = torch.zeros_like(logps).detach()
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return losses, kl, clipped.detach()


def grpo_loss(
    token_losses: torch.Tensor, rows: torch.Tensor, answers: int, loss_type: str, denom: float
) -> torch.Tensor:
    """The GRPO losses of one micro-batch's answer tokens reduced as ``loss_type`` says, over the step's ``denom``.

    token_losses: [N]; rows: [N] the answer of each token (0 .. answers - 1). ``denom`` is the whole optimizer
    step's (every micro-batch and process), so accumulation gives the gradient of one big batch:

    * sequence: each answer's mean over its tokens, summed; ``denom`` = the step's answers
    * token: the sum over every answer token; ``denom`` = the step's answer tokens
    * dr_grpo: the sum over every answer token; ``denom`` = the step's answers x max_new_tokens (a constant)
    """
    if loss_type == "sequence":
        return sequence_logps(token_losses, rows, answers, average=True).sum() / denom
    if loss_type in ("token", "dr_grpo"):
        return token_losses.sum() / denom
    raise ValueError(f"unknown GRPO loss {loss_type!r}")
