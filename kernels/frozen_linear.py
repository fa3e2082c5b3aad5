"""A frozen linear layer that multiplies in its weight's (16-bit) dtype and answers in its input's dtype.

``frozen_linear(x, weight, bias)`` returns ``x @ weight.T + bias`` in ``x.dtype`` with the matrix product done in
``weight.dtype``: with a bfloat16 weight and a float32 input, x is rounded to bfloat16, multiplied on the CPU's
bf16 units (AVX-512 BF16 / AMX; float32 accumulation inside oneDNN) and the product comes back as float32, so
everything around it (a LoRA delta added to it, the residual stream, the norms) stays float32.

The weight is frozen: the backward pass only computes ``grad_x = (grad_out @ weight)`` in ``weight.dtype``,
returned in ``x.dtype``. Nothing but the weight is kept for the backward pass (no copy of x), unlike autograd
through ``x.to(bf16)``, which keeps nothing either but goes through three graph nodes.

Layering: reference (``frozen_linear_reference``: the whole product in float32) -> autograd Function
(``_FrozenLinear``) -> public op (``frozen_linear`` with ``impl='auto'|'torch'``; ``torch`` is the same maths
traced by autograd through casts, kept as the eager cross-check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frozen_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager float32 reference: x [..., in], weight [out, in], bias [out] -> [..., out] in x.dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = None if bias is None else bias.to(acc)
    return F.linear(x.to(acc), weight.to(acc), b).to(x.dtype)


def _frozen_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same maths as ``_FrozenLinear``, through autograd: cast, product in weight.dtype, cast back, bias."""
    out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


class _FrozenLinear(torch.autograd.Function):
    """y = (x_w @ W.T)_x + b, with x_w = x rounded to W's dtype; dy/dx = (g_w @ W)_x; W and b get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)  # [..., out]
        return out if bias is None else out.add_(bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out.to(weight.dtype) @ weight).to(ctx.x_dtype)  # [..., in]
        return grad_x, None, None


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` computed in ``weight.dtype``, returned in ``x.dtype``; weight and bias frozen.

    impl: ``auto`` (the autograd Function) or ``torch`` (autograd through the casts; the same numbers).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen_linear: the weight and bias must be frozen (requires_grad=False)")
    if impl == "torch":
        return _frozen_linear_torch(x, weight, bias)
    if impl != "auto":
        raise ValueError(f"frozen_linear: impl must be 'auto' or 'torch', not {impl!r}")
    return _FrozenLinear.apply(x, weight, bias)
