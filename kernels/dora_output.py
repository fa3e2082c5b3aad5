"""A DoRA linear layer's output from its base output and its adapter output, saving one tensor for backward.

DoRA (https://arxiv.org/abs/2402.09353) rescales each output feature o of ``W x + s B A x`` by
``magnitude_o / n_o``, with ``n = ||W + s B A||`` per row detached (section 4.3: no gradient through the norm):

    y = (m / n) * (base + s * lora),    base = W x (+ no bias),  lora = B A x          [..., out]
    dy/dbase = g * (m / n),   dy/dlora = s * g * (m / n),   dL/dm = sum_tokens(g * y) / m

peft computes ``result + (m/n - 1) * base + (m/n) * lora * s`` and autograd keeps both ``base`` and ``lora``
(two output-sized float32 tensors per DoRA layer and token) for the magnitude's gradient. Here only ``y`` is kept:
the layer's own output, which the next op often keeps anyway (SwiGLU keeps the gate and up projections' outputs,
attention keeps v), so for those layers DoRA adds nothing to the saved memory. ``y`` is kept in the wider of the
two inputs' dtypes (a bf16 base with float32 adapters: float32 ``y``, not the bf16 output, so that the magnitude's
gradient is as exact as peft's). Where a magnitude is 0 (``y`` then says nothing about ``base + s lora``) the sum
itself is kept instead.

Layering: reference (``dora_output_reference``: peft's expression) -> autograd Function (``_DoraOutput``) -> public
op (``dora_output`` with ``impl='auto'|'torch'``).
"""

from __future__ import annotations

import torch

IMPLS = ("auto", "torch")


def dora_output_reference(
    base: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor, weight_norm: torch.Tensor, scaling: float
) -> torch.Tensor:
    """peft 0.21's ``result + DoraLinearLayer.forward(...)``, traced by autograd, cast back to base's dtype."""
    scale = (magnitude / weight_norm.detach()).view(1, -1)
    return (base + ((scale - 1) * base + scale * lora * scaling)).to(base.dtype)


class _DoraOutput(torch.autograd.Function):
    """y = (m / n) (base + s lora); keeps y (or base + s lora where some m is 0) and m / n."""

    @staticmethod
    def forward(ctx, base, lora, magnitude, weight_norm, scaling):
        scale = magnitude.detach() / weight_norm
        summed = torch.add(base, lora, alpha=scaling) if lora.dtype == base.dtype else base + scaling * lora
        ctx.scaling, ctx.base_dtype, ctx.lora_dtype = scaling, base.dtype, lora.dtype
        if bool((magnitude != 0).all()):
            y = summed.mul_(scale.to(summed.dtype))  # in the wider of base's and lora's dtypes
            out = y.to(base.dtype)  # y itself for a float32 base: the output is what is kept
            ctx.save_for_backward(y, magnitude, scale)
        else:  # y = 0 where m = 0: keep the sum itself
            out = (summed * scale.to(summed.dtype)).to(base.dtype)
            ctx.save_for_backward(summed, weight_norm, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        kept, divisor, scale = ctx.saved_tensors
        acc = torch.promote_types(grad.dtype, scale.dtype)
        g = grad.to(acc)
        grad_base = grad_lora = grad_m = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gs = g * scale.to(acc)
            if ctx.needs_input_grad[0]:
                grad_base = gs.to(ctx.base_dtype)
            if ctx.needs_input_grad[1]:
                grad_lora = (gs * ctx.scaling).to(ctx.lora_dtype)
        if ctx.needs_input_grad[2]:
            # from y: sum(g y) / m; from the sum: sum(g (base + s lora)) / n
            flat_g, flat_k = g.reshape(-1, g.shape[-1]), kept.reshape(-1, kept.shape[-1]).to(acc)
            # vecdot over the token axis: ~0.6 ms for [944, 1536] on one core, einsum("to,to->o") ~18 ms
            grad_m = torch.linalg.vecdot(flat_g.t(), flat_k.t()).div_(divisor.to(acc)).to(divisor.dtype)
        return grad_base, grad_lora, grad_m, None, None


def dora_output(
    base: torch.Tensor,
    lora: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: float,
    impl: str = "auto",
) -> torch.Tensor:
    """``(magnitude / weight_norm) * (base + scaling * lora)`` in ``base.dtype``; ``weight_norm`` gets no gradient.

    base [..., out] (the frozen layer's output, bias excluded), lora [..., out] (``B A x``), magnitude and
    weight_norm [out]. impl: ``auto`` (the autograd Function, one saved output-sized tensor) or ``torch`` (peft's
    expression, the cross-check)."""
    if base.shape != lora.shape or magnitude.shape != weight_norm.shape or magnitude.shape != base.shape[-1:]:
        raise ValueError(
            f"dora_output: base {list(base.shape)} and lora {list(lora.shape)} must match, magnitude "
            f"{list(magnitude.shape)} and weight_norm {list(weight_norm.shape)} must be [{base.shape[-1]}]"
        )
    if impl == "torch":
        return dora_output_reference(base, lora, magnitude, weight_norm, scaling)
    if impl != "auto":
        raise ValueError(f"dora_output: impl must be one of {', '.join(IMPLS)}, not {impl!r}")
    return _DoraOutput.apply(base, lora, magnitude, weight_norm.detach(), float(scaling))
