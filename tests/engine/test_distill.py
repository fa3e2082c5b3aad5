"""Knowledge distillation: the chunked loss against a direct full-vocabulary computation, and the objective."""

from __future__ import annotations

import pytest
import torch

from finetune_studio.kernels.distill_logits import distill_losses

# --- the loss ------------------------------------------------------------------------------------------------------


def direct_kl(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The divergence per row written out from its definition on the full [N, V] probabilities."""
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    if divergence == "forward_kl":
        return (pt * (pt.log() - ps.log())).sum(-1)
    if divergence == "reverse_kl":
        return (ps * (ps.log() - pt.log())).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)


def direct_losses(hs, ws, ht, wt, targets, divergence, temperature, alpha, beta):
    zs = hs @ ws.t()
    zt = (ht @ wt.t()).detach()
    kl = direct_kl(zs / temperature, zt / temperature, divergence, beta)
    ce = -torch.log_softmax(zs, -1).gather(-1, targets[:, None]).squeeze(-1)
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("impl,chunk", [("torch", 0), ("chunked", 1), ("chunked", 7), ("chunked", 64)])
@pytest.mark.parametrize("train_head", [False, True])
def test_loss_and_gradients_equal_the_direct_full_vocabulary_computation(divergence, impl, chunk, train_head):
    torch.manual_seed(3)
    n, h, ht_size, v = 37, 16, 24, 101  # the teacher wider than the student; sizes not multiples of the chunk
    hs = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ws = (torch.randn(v, h, dtype=torch.float64) * 0.5).requires_grad_(train_head)
    ht = torch.randn(n, ht_size, dtype=torch.float64)
    wt = torch.randn(v, ht_size, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n,))
    weights = torch.rand(n, dtype=torch.float64)  # an arbitrary upstream gradient per position
    opts = dict(divergence=divergence, temperature=2.0, alpha=0.7, beta=0.3)
    wanted = (hs, ws) if train_head else (hs,)

    loss, kl, ce = direct_losses(hs, ws, ht, wt, targets, **opts)
    expected_grads = torch.autograd.grad((loss * weights).sum(), wanted)
    out = distill_losses(hs, ws, ht, wt, targets, impl=impl, chunk=chunk or 512, **opts)
    grads = torch.autograd.grad((out.loss * weights).sum(), wanted)

    assert torch.allclose(out.loss, loss, atol=1e-10)
    assert torch.allclose(out.kl, kl, atol=1e-10) and torch.allclose(out.ce, ce, atol=1e-10)
    assert (out.kl >= -1e-12).all() and not out.kl.requires_grad and not out.ce.requires_grad
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-9)


def test_jsd_equals_trls_generalised_jsd(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(0)
    zs, zt = torch.randn(9, 50, dtype=torch.float64), torch.randn(9, 50, dtype=torch.float64)
    eye = torch.eye(50, dtype=torch.float64)  # hidden = logits through an identity head
    for beta in (0.1, 0.5, 0.9):
        ours = distill_losses(zs, eye, zt, eye, torch.zeros(9, dtype=torch.long), divergence="jsd", beta=beta, alpha=1)
        trl = GKDTrainer.generalized_jsd_loss(zs[None], zt[None], beta=beta, temperature=1.0, reduction="sum")
        assert torch.allclose(ours.kl.sum(), trl, atol=1e-10)


def test_the_kl_is_zero_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (20,))
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        out = distill_losses(hidden, weight, hidden, weight, targets, divergence=divergence, chunk=6)
        assert out.kl.abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_close_to_float64(dtype):
    torch.manual_seed(1)
    hs, ws = torch.randn(30, 16), torch.randn(64, 16) * 0.2
    ht, wt = torch.randn(30, 16), torch.randn(64, 16) * 0.2
    targets = torch.randint(0, 64, (30,))
    exact = distill_losses(hs.double(), ws.double(), ht.double(), wt.double(), targets, impl="torch")
    h = hs.to(dtype).requires_grad_()
    out = distill_losses(h, ws.to(dtype), ht.to(dtype), wt.to(dtype), targets, chunk=8)
    out.loss.sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss.double(), exact.loss, atol=tol)
    assert h.grad is not None and h.grad.dtype == dtype


def test_bad_settings_are_refused_by_name():
    hs, ws, targets = torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="beta"):
        distill_losses(hs, ws, hs, ws, targets, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="divergence"):
        distill_losses(hs, ws, hs, ws, targets, divergence="kl")
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill_losses(hs, ws, hs, torch.randn(6, 4), targets)
