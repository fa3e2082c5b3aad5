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


def ppo_token_rewards(
    scores: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    kl_coef: float,
) -> torch.Tensor:
    """PPO's reward per answer token: the KL penalty to the reference on every token, the answer's score on its last
    (the RLHF shaping of Ziegler et al. 2019 and InstructGPT, as TRL's PPO).

    scores: [B] each answer's reward; old_logps, ref_logps: [N] the sampling policy's and the reference's log-probs
    of the answer tokens (ref None: no penalty); rows: [N] the answer of each token, each answer's tokens consecutive
    and in order. ``r_t = -kl_coef * (log pi_old - log pi_ref)``, plus ``score`` at the answer's last token -> [N].
    """
    rewards = torch.zeros_like(old_logps) if ref_logps is None else -kl_coef * (old_logps - ref_logps)
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    return rewards + torch.where(last, scores.to(rewards.dtype)[rows], torch.zeros_like(rewards))


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each answer's tokens, and the returns.

    rewards, values: [N] per answer token (the value ``V_t`` of the state before the token); rows: [N] the answer of
    each token, each answer's tokens consecutive and in order. Per answer, with ``V`` after its last token 0:

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, ``R_t = A_t + V_t``.

    Returns (advantages [N], returns [N]), without gradient.
    """
    rewards, values = rewards.detach(), values.detach()
    answers = int(rows.max()) + 1 if rows.numel() else 0
    counts = torch.bincount(rows, minlength=answers)  # [B] tokens of each answer
    starts = counts.cumsum(0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]  # each token's place in its answer
    width = int(counts.max()) if answers else 0
    r = rewards.new_zeros(answers, width + 1)  # [B, T + 1]: 0 past each answer's end
    v = values.new_zeros(answers, width + 1)
    r[rows, pos], v[rows, pos] = rewards, values
    adv = rewards.new_zeros(answers, width + 1)
    for t in reversed(range(width)):  # past an answer's end r = V = 0, so its A stays 0 until its last token
        delta = r[:, t] + gamma * v[:, t + 1] - v[:, t]
        adv[:, t] = delta + gamma * lam * adv[:, t + 1]
    advantages = adv[rows, pos]
    return advantages, advantages + values


def whiten(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over all of ``values`` (the sample variance, as TRL's ``whiten``)."""
    if values.numel() < 2:
        return values - values.mean()
    return (values - values.mean()) * torch.rsqrt(values.var() + eps)


def ppo_value_losses(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token, and where the clip decides it.

    All [N]: the value head's predictions ``V`` (with gradient), the sampling-time values ``V_old`` and the returns
    ``R``. With ``V_clip = clip(V, V_old - c, V_old + c)``:

    ``loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)``; clipped: the second is the larger (no gradient through V).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    plain = (values - returns) ** 2
    bounded = (clipped_values - returns) ** 2
    return 0.5 * torch.max(plain, bounded), (bounded > plain).detach()


def ppo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's policy and value losses per answer token (Schulman et al. 2017, eq. 7 and 9; TRL's PPO).

    All [N]: ``log pi`` (with gradient), ``log pi_old``, the advantages (GAE, whitened), the value head's ``V`` (with
    gradient), ``V_old`` and the returns. With ``rho = exp(log pi - log pi_old)``:

    ``policy_t = -min(rho * A, clip(rho, 1 - cliprange, 1 + cliprange) * A)`` (:func:`grpo_token_losses` without
    a KL term: PPO's KL is in the rewards) and ``value_t`` from :func:`ppo_value_losses`. The step's loss is
    ``sum(policy_t + vf_coef * value_t) / tokens``.

    Returns (policy [N], value [N], policy clipped [N] bool, value clipped [N] bool).
    """
    policy, _, clipped = grpo_token_losses(logps, old_logps, None, advantages, epsilon=cliprange)
    value, value_clipped = ppo_value_losses(values, old_values, returns, cliprange_value=cliprange_value)
    return policy, value, clipped, value_clipped
