"""The loss functions against their formulas. The cross-check against TRL itself (same tokens, same losses) is
tests/engine/test_train_bench.py, which runs both trainers."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune_studio.engine.train.losses import dpo_loss, sequence_logps, sft_loss

PC = torch.tensor([-10.0, -12.0, -7.5])
PR = torch.tensor([-11.0, -11.0, -9.0])
RC = torch.tensor([-10.5, -12.0, -8.0])
RR = torch.tensor([-10.5, -10.0, -8.5])


def _h():
    return (PC - RC) - (PR - RR)


def test_sigmoid_dpo_matches_formula_by_hand():
    beta = 0.1
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=beta)
    expected = [-math.log(1 / (1 + math.exp(-beta * h))) for h in _h().tolist()]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rc.tolist() == pytest.approx((beta * (PC - RC)).tolist())
    assert rr.tolist() == pytest.approx((beta * (PR - RR)).tolist())


def test_label_smoothing_ipo_and_hinge_match_their_formulas():
    beta, eps = 0.5, 0.2
    h = _h()
    smoothed, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    assert torch.allclose(smoothed, -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h))
    ipo, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    assert torch.allclose(ipo, (h - 1 / (2 * beta)) ** 2)
    hinge, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    assert torch.allclose(hinge, torch.relu(1 - beta * h))


def test_dpo_at_reference_is_log_two():
    losses, rc, rr = dpo_loss(PC, PR, PC, PR)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(rc == 0) and torch.all(rr == 0)


def test_sequence_logps_sum_and_mean():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rows = torch.tensor([0, 0, 2, 2])
    assert sequence_logps(logps, rows, 3).tolist() == [-3.0, 0.0, -7.0]
    assert sequence_logps(logps, rows, 3, average=True).tolist() == [-1.5, 0.0, -3.5]


def test_sft_loss_is_token_mean_over_the_whole_step():
    a, b = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0])
    # Two micro-batches of one step, normalised by the step's 3 tokens, sum to the mean.
    assert (sft_loss(a, 3) + sft_loss(b, 3)).item() == pytest.approx(2.0)
