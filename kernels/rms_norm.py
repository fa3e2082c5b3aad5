"""RMSNorm as Llama computes it, saving only its input and the per-row ``rstd`` for backward (Liger-style).

Transformers' ``LlamaRMSNorm`` (float32 maths whatever the input dtype; here float64 for a float64 input)::

    x32 = x.float();  rstd = rsqrt(mean(x32^2, -1) + eps);  y = weight * (x32 * rstd).to(x.dtype)

Its autograd ops keep ``x32`` (a float32 copy of x when x is 16-bit) and ``rstd``. This op keeps ``x`` in its own
dtype and ``rstd`` (4 bytes a row). Backward, with ``n = x32 * rstd`` and ``gn = (dL/dy * weight).float()``::

    dL/dx = rstd * (gn - n * mean(gn * n, -1))          (cast to x's dtype)
    dL/dweight = sum over rows of dL/dy * n.to(x.dtype)  (only when the weight trains)

float32 CPU tensors go through ``kernels.cpu_rms_norm`` where it runs (AVX-512: each way one pass over a row
instead of six to eight ops over the whole tensor; the sums in another order, so within float32 rounding of the
torch path, not bit for bit); ``NATIVE = False`` keeps torch's ops (for comparisons). The weight's gradient, when
the weight trains, is torch's either way.

Layering: reference (``rms_norm_reference``) -> autograd Function (``_RMSNorm``) -> public op (``rms_norm`` with
``impl='auto'|'torch'|'reference'``).
"""

from __future__ import annotations

import torch

from finetune_studio.kernels import cpu_rms_norm

NATIVE = True  # float32 CPU tensors through kernels.cpu_rms_norm where it runs


def _native(*tensors: torch.Tensor) -> bool:
    return NATIVE and cpu_rms_norm.runs_on(*tensors)


def _acc(x: torch.Tensor) -> torch.dtype:
    """float32 maths (as transformers), float64 for float64 inputs (so that gradcheck can check the formula)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eager reference: transformers 5's ``LlamaRMSNorm.forward``."""
    x32 = x.to(_acc(x))
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.to(_acc(x))
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The output from the input and its saved ``rstd``, without a graph (for a recompute)."""
    with torch.no_grad():
        if _native(x, weight) and rstd.dtype == torch.float32:
            return cpu_rms_norm.rms_norm_forward_native(x, weight, 0.0, rstd)[0]
        return weight * (x.to(rstd.dtype) * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, native=True):
        ctx.native = native
        if native and _native(x, weight):
            out, rstd = cpu_rms_norm.rms_norm_forward_native(x, weight, eps)
        else:
            n, rstd = _normalize(x, eps)
            out = weight * n.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return out, rstd

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        d_x = d_w = None
        if ctx.needs_input_grad[0] and ctx.native and _native(grad, x, weight):
            d_x = cpu_rms_norm.rms_norm_backward_native(grad, x, weight, rstd)
            if not ctx.needs_input_grad[1]:
                return d_x, None, None, None
        n = x.to(rstd.dtype) * rstd
        if ctx.needs_input_grad[0] and d_x is None:
            gn = (grad * weight).to(rstd.dtype)
            d_x = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d_w = (grad * n.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return d_x, d_w, None, None


def rms_norm_with_rstd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, native: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, rstd): the op's output and the float32 ``rstd`` it saved ([..., 1], no gradient). ``native``:
    float32 CPU tensors through ``kernels.cpu_rms_norm`` where it runs (and ``NATIVE`` is on)."""
    return _RMSNorm.apply(x, weight, eps, native)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: str = "auto") -> torch.Tensor:
    """Public op: Llama's RMSNorm. ``impl``: 'auto' / 'torch' (the autograd Function above, saving x and rstd;
    'auto' through ``kernels.cpu_rms_norm`` for float32 CPU tensors where it runs), or 'reference' (transformers'
    ops)."""
    if impl == "reference":
        return rms_norm_reference(x, weight, eps)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    return rms_norm_with_rstd(x, weight, eps, native=impl == "auto")[0]
