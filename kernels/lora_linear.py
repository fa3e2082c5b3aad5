"""A LoRA linear layer over a frozen base in one autograd node: ``base(x) + s * (x A^T) B^T``.

peft's LoRA ``Linear.forward`` computes the base output, ``lora_B(lora_A(x))``, multiplies it by the scaling and
adds it to the base output: two more passes over the [tokens, out] output in the forward, two in the backward (the
scaling's gradient and the sum of the two input gradients), and about ten autograd nodes per layer. ``lora_linear``
adds the low-rank product straight into the base output (``addmm_`` with ``alpha = s``) and, in the backward,
the low-rank part of the input gradient straight into the base part; the scaling is applied to the [tokens, r]
factors only. The same maths in float32 (the order of the additions differs: results agree to rounding).

The base weight is frozen and may be 16-bit (bf16-mixed): the product ``x @ W^T`` is then done in the weight's
dtype (x rounded to it) and comes back in x's dtype, as ``kernels.frozen_linear`` does, and so is the backward's
``g @ W``. What is kept for backward: x (which peft's ``lora_A`` keeps anyway, and which
``kernels.recompute.recompute_when_saved`` may replace), the [tokens, r] product ``x A^T``, and the weights.

Layering: reference (``lora_linear_reference``: everything in float32 through autograd, as peft computes it) ->
autograd Function (``_LoraLinear``) -> public op (``lora_linear`` with ``impl='auto'|'torch'``; ``torch`` is the
reference's maths with the base product in the weight's dtype, through autograd).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Eager float32 reference: ``x @ W^T + b + s * (x @ A^T) @ B^T``; x [..., in], W [out, in], A [r, in],
    B [out, r] -> [..., out] in x.dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    base = F.linear(xa, weight.to(acc), None if bias is None else bias.to(acc))
    return (base + F.linear(F.linear(xa, lora_a.to(acc)), lora_b.to(acc)) * scaling).to(x.dtype)


def _base(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` in W's dtype, returned in x's dtype as a fresh tensor (safe to add into)."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight)
    return F.linear(x.to(weight.dtype), weight).to(x.dtype)


def _lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The same maths as ``_LoraLinear``, through autograd (peft's order: base, then the scaled low-rank part)."""
    out = _base(x, weight)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out + F.linear(F.linear(x, lora_a), lora_b) * scaling


class _LoraLinear(torch.autograd.Function):
    """y = (x_w W^T)_x + b + s (x A^T) B^T; W and b frozen; gradients for x, A and B."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        n_in, n_out = weight.shape[1], weight.shape[0]
        out = _base(x, weight)  # [..., out], fresh and contiguous
        if bias is not None:
            out.add_(bias.to(out.dtype))
        xa = x.reshape(-1, n_in) @ lora_a.t()  # [N, r]
        out.view(-1, n_out).addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        n_in, n_out = weight.shape[1], weight.shape[0]
        g = grad_out.reshape(-1, n_out)
        gb = g @ lora_b  # [N, r]
        if s != 1.0:
            gb.mul_(s)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_b = g.t() @ (xa * s if s != 1.0 else xa)  # [out, r]
        if ctx.needs_input_grad[3]:
            grad_a = gb.t() @ x.reshape(-1, n_in)  # [r, in]
        if ctx.needs_input_grad[0]:
            if weight.dtype == g.dtype:
                gx = g @ weight
            else:
                gx = (g.to(weight.dtype) @ weight).to(g.dtype)  # [N, in]
            gx.addmm_(gb, lora_a)
            grad_x = gx.view(x.shape).to(x.dtype)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    impl: str = "auto",
) -> torch.Tensor:
    """``x @ W^T + b + scaling * (x @ A^T) @ B^T`` with W and b frozen; the base product in W's dtype.

    x [..., in] (float32 under bf16-mixed), weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r]
    in x's dtype. impl: ``auto`` (the autograd Function) or ``torch`` (autograd through the same maths)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise ValueError(f"lora_linear: the adapter weights must be in x's dtype ({x.dtype})")
    if impl == "torch":
        return _lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling)
    if impl != "auto":
        raise ValueError(f"lora_linear: impl must be 'auto' or 'torch', not {impl!r}")
    out: torch.Tensor = _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
    return out
