"""Knowledge-distillation losses through two output heads, without materialising either vocabulary distribution.

For each trained position ``i`` the student's logits are ``zs_i = hs_i @ Ws.T`` and the teacher's
``zt_i = ht_i @ Wt.T`` (each through its model's soft cap, if any). With temperature ``T``,
``ps = softmax(zs / T)``, ``pt = softmax(zt / T)``:

* forward KL: ``KL(pt || ps) = sum_v pt (log pt - log ps)`` (mean-seeking; classic Hinton distillation)
* reverse KL: ``KL(ps || pt) = sum_v ps (log ps - log pt)`` (mode-seeking)
* generalised JSD (Agarwal et al. 2024, GKD): with ``m = beta * pt + (1 - beta) * ps``,
  ``beta * KL(pt || m) + (1 - beta) * KL(ps || m)``, ``0 < beta < 1``

and the cross-entropy of the target token at temperature 1, ``ce_i = -log softmax(zs_i)[t_i]``. The per-position
loss is ``alpha * T^2 * kl_i + (1 - alpha) * ce_i`` (the ``T^2`` keeps the soft targets' gradient on the scale of
the hard ones').

The eager reference (``distill_losses_reference``) builds both ``[N, V]`` logits in float32. The chunked op
computes ``chunk`` positions at a time, so at most a few ``chunk x V`` tensors exist at once. Its gradient is
written out, d loss / d zs =

* forward KL: ``(ps - pt) / T``
* reverse KL: ``ps * (d - kl) / T`` with ``d = log ps - log pt``
* JSD: ``ps * (g - sum ps g) / T`` with ``g = (1 - beta) (log ps - log m)``
* CE: ``softmax(zs) - onehot(t)``

When only the student's hidden states need a gradient (a frozen head: adapter training), the forward pass computes
``d loss_i / d hs_i`` while each chunk's logits exist and keeps that ([N, Hs], the size of ``hs``) instead of
recomputing both heads in backward (as ``linear_logprobs`` does); otherwise the logits are recomputed in backward.
The teacher never gets a gradient.

Layering: reference (``distill_losses_reference``) -> chunked autograd (``_ChunkedDistill``) -> public op
(``distill_losses`` with ``impl='chunked'|'torch'``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IMPLS = ("auto", "chunked", "torch")
DEFAULT_CHUNK = 256  # positions per chunk: each holds about eight [chunk, V] float32 tensors (core.memory.estimate)


class DistillLosses(NamedTuple):
    loss: torch.Tensor  # [N] alpha * T^2 * kl + (1 - alpha) * ce, differentiable with respect to the student
    kl: torch.Tensor  # [N] the divergence at temperature T (detached)
    ce: torch.Tensor  # [N] -log p_student(target) at temperature 1 (detached)


def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _capped(raw: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(raw / softcap) if softcap else raw


def _check(divergence: str, temperature: float, alpha: float, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be above 0, not {temperature!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], not {alpha!r}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"the JSD's beta must be in (0, 1), not {beta!r} (0 and 1 are the KLs: choose those)")


# --- the eager reference ------------------------------------------------------------------------------------------


def divergence_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """Per-row divergence of two [N, V] logit tensors (already divided by T), through torch's own ops: [N]."""
    ls = F.log_softmax(student_logits, dim=-1)
    lt = F.log_softmax(teacher_logits, dim=-1)
    if divergence == "forward_kl":
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
    to_teacher = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)  # KL(pt || m)
    to_student = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)  # KL(ps || m)
    return beta * to_teacher + (1 - beta) * to_student


def distill_losses_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> DistillLosses:
    """Eager reference: both heads' full [N, V] logits in float32, the loss through autograd."""
    _check(divergence, temperature, alpha, beta)
    acc = _acc_dtype(student_hidden)
    zs = _capped((student_hidden @ student_weight.t()).to(acc), student_softcap)  # [N, V]
    with torch.no_grad():
        zt = _capped((teacher_hidden @ teacher_weight.t()).to(acc), teacher_softcap)  # [N, V]
    kl = divergence_reference(zs / temperature, zt / temperature, divergence, beta)
    ce = F.cross_entropy(zs, targets, reduction="none")
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    return DistillLosses(loss, kl.detach(), ce.detach())


# --- chunk by chunk ---------------------------------------------------------------------------------------------


def _chunk_terms(
    hs: torch.Tensor,
    ws: torch.Tensor,
    ht: torch.Tensor,
    wt: torch.Tensor,
    t: torch.Tensor,
    opts: tuple[Any, ...],
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk: its kl [c], ce [c] and, with ``want_grad``, d loss / d raw student logits [c, V]."""
    divergence, temperature, alpha, beta, s_cap, t_cap = opts
    acc = _acc_dtype(hs)
    raw = (hs @ ws.t()).to(acc)  # [c, V]
    zs = _capped(raw, s_cap)
    ls = torch.log_softmax(zs / temperature, dim=-1)  # [c, V]
    lt = torch.log_softmax(_capped((ht @ wt.t()).to(acc), t_cap) / temperature, dim=-1)  # [c, V]
    ps = ls.exp()
    if divergence == "forward_kl":
        pt = lt.exp()
        kl = (pt * (lt - ls)).sum(-1)
        g_kl = (ps - pt) if want_grad else None
        del pt
    elif divergence == "reverse_kl":
        d = ls - lt
        kl = (ps * d).sum(-1)
        g_kl = ps * (d - kl[:, None]) if want_grad else None
        del d
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))  # log m
        kl = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
        if want_grad:
            g = (1 - beta) * (ls - lm)
            g_kl = ps * (g - (ps * g).sum(-1, keepdim=True))
            del g
        else:
            g_kl = None
        del lm
    del lt, ls
    lse = torch.logsumexp(zs, dim=-1)  # temperature 1
    ce = lse - zs.gather(-1, t[:, None]).squeeze(-1)
    if not want_grad:
        return kl, ce, None
    assert g_kl is not None
    # d loss / d zs = alpha T^2 (d kl / d zs) + (1 - alpha) (softmax(zs) - onehot); d kl / d zs = g_kl / T
    grad = g_kl.mul_(alpha * temperature)
    p1 = (zs - lse[:, None]).exp_()
    p1.scatter_add_(-1, t[:, None], torch.full_like(p1[:, :1], -1.0))
    grad.add_(p1, alpha=1 - alpha)
    del p1, ps
    if s_cap:
        grad.mul_(1 - torch.tanh(raw / s_cap) ** 2)
    return kl, ce, grad


class _ChunkedDistill(torch.autograd.Function):
    """Forward and backward chunk by chunk; outputs (loss [N], kl [N], ce [N]), only ``loss`` differentiable."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, opts, chunk, grad_wanted):  # type: ignore[no-untyped-def]
        acc = _acc_dtype(hs)
        n = hs.shape[0]
        kl = torch.empty(n, dtype=acc, device=hs.device)
        ce = torch.empty(n, dtype=acc, device=hs.device)
        in_forward = grad_wanted and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hs) if in_forward else None
        for s in range(0, n, chunk):
            k, c, g = _chunk_terms(
                hs[s : s + chunk], ws, ht[s : s + chunk], wt, targets[s : s + chunk], opts, grad_h is not None
            )
            kl[s : s + chunk], ce[s : s + chunk] = k, c
            if grad_h is not None and g is not None:
                grad_h[s : s + chunk] = g.to(hs.dtype) @ ws
            del g  # before the next chunk's are made
        _divergence, temperature, alpha = opts[:3]
        loss = alpha * temperature**2 * kl + (1 - alpha) * ce
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hs, ws, ht, wt, targets)
        ctx.in_forward, ctx.opts, ctx.chunk = in_forward, opts, chunk
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):  # type: ignore[no-untyped-def]
        none = (None,) * 6
        if ctx.in_forward:
            (grad_h,) = ctx.saved_tensors
            return (grad_h * grad_loss[:, None].to(grad_h.dtype), None, *none)
        hs, ws, ht, wt, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _acc_dtype(hs)
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_w else None
        for s in range(0, hs.shape[0], ctx.chunk):
            h = hs[s : s + ctx.chunk]
            _, _, g = _chunk_terms(h, ws, ht[s : s + ctx.chunk], wt, targets[s : s + ctx.chunk], ctx.opts, True)
            assert g is not None
            g = g.mul_(grad_loss[s : s + ctx.chunk, None].to(acc)).to(hs.dtype)
            if grad_h is not None:
                grad_h[s : s + ctx.chunk] = g @ ws
            if grad_w is not None:
                grad_w.add_((g.t() @ h).to(acc))
        return (grad_h, None if grad_w is None else grad_w.to(ws.dtype), *none)


def distill_losses(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    impl: str = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> DistillLosses:
    """Public op. student_hidden [N, Hs], student_weight [V, Hs], teacher_hidden [N, Ht], teacher_weight [V, Ht],
    targets [N] -> :class:`DistillLosses` of [N] float32 (float64 for float64 input). The two heads must share
    their vocabulary (the same tokenizer; slice a padded head to the common rows first).

    ``impl``: 'torch' (the eager reference, both full [N, V] logits), 'chunked' (``chunk`` positions at a time,
    no logits kept for backward), 'auto' (chunked)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    _check(divergence, temperature, alpha, beta)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"the heads' vocabularies differ ({student_weight.shape[0]} and {teacher_weight.shape[0]} rows)"
        )
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    if impl == "torch":
        return distill_losses_reference(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            targets,
            divergence=divergence,
            temperature=temperature,
            alpha=alpha,
            beta=beta,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
        )
    opts = (divergence, float(temperature), float(alpha), float(beta), student_softcap, teacher_softcap)
    loss, kl, ce = _ChunkedDistill.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, opts, chunk, torch.is_grad_enabled()
    )
    return DistillLosses(loss, kl, ce)
