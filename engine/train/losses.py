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
