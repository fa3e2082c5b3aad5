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
the weight trains, is torch's either way. ``out_dtype=torch.bfloat16`` (``rms_norm_with_rstd``, float32 x): the
output rounded to bf16 once and its gradient read in bf16, for a consumer that rounds the output to bf16 anyway
(``engine.train.model_patches.fused_ops``); with AVX-512 BF16 written and read so by the C kernels, no casts.

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


def _native_bf16(out_dtype: torch.dtype | None, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A bf16 output from float32 tensors in one pass (``cpu_rms_norm``'s bf16 kernels)."""
    return out_dtype == torch.bfloat16 and cpu_rms_norm.bf16_available() and _native(x, weight)


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The output from the input and its saved ``rstd``, without a graph (for a recompute); ``out_dtype`` as the
    op's (the same tensor)."""
    with torch.no_grad():
        if out_dtype is not None and out_dtype != torch.promote_types(x.dtype, weight.dtype):
            if _native_bf16(out_dtype, x, weight) and rstd.dtype == torch.float32:
                return cpu_rms_norm.rms_norm_forward_native(x, weight, 0.0, rstd, out_dtype=out_dtype)[0]
            return rms_norm_forward(x, weight, rstd).to(out_dtype)
        if _native(x, weight) and rstd.dtype == torch.float32:
            return cpu_rms_norm.rms_norm_forward_native(x, weight, 0.0, rstd)[0]
        return weight * (x.to(rstd.dtype) * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, native=True, out_dtype=None):
        ctx.native, ctx.wide = native, torch.promote_types(x.dtype, weight.dtype)
        narrow = out_dtype is not None and out_dtype != ctx.wide
        if native and narrow and _native_bf16(out_dtype, x, weight):
            out, rstd = cpu_rms_norm.rms_norm_forward_native(x, weight, eps, out_dtype=out_dtype)
        elif native and _native(x, weight):
            out, rstd = cpu_rms_norm.rms_norm_forward_native(x, weight, eps)
        else:
            n, rstd = _normalize(x, eps)
            out = weight * n.to(x.dtype)
        if narrow and out.dtype != out_dtype:
            out = out.to(out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return out, rstd

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        d_x = d_w = None
        native = ctx.needs_input_grad[0] and ctx.native
        if native and grad.dtype == torch.bfloat16 and cpu_rms_norm.bf16_available() and _native(x, weight):
            d_x = cpu_rms_norm.rms_norm_backward_native(grad, x, weight, rstd)  # a bf16 output's gradient, widened
            if not ctx.needs_input_grad[1]:
                return d_x, None, None, None, None
        if grad.dtype != ctx.wide:  # a narrow output's gradient (out_dtype): its value in the usual dtype, exactly
            grad = grad.to(ctx.wide)
        if d_x is None and native and _native(grad, x, weight):
            d_x = cpu_rms_norm.rms_norm_backward_native(grad, x, weight, rstd)
            if not ctx.needs_input_grad[1]:
                return d_x, None, None, None, None
        n = x.to(rstd.dtype) * rstd
        if ctx.needs_input_grad[0] and d_x is None:
            gn = (grad * weight).to(rstd.dtype)
            d_x = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d_w = (grad * n.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return d_x, d_w, None, None, None


def rms_norm_with_rstd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, native: bool = True, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, rstd): the op's output and the float32 ``rstd`` it saved ([..., 1], no gradient). ``native``:
    float32 CPU tensors through ``kernels.cpu_rms_norm`` where it runs (and ``NATIVE`` is on). ``out_dtype``: None
    (the usual dtype) or a narrower one the output is rounded to once (float32 x and weight, bf16 out: the float32
    output ``.to(torch.bfloat16)`` bit for bit, in one pass where ``cpu_rms_norm.bf16_available()``); its gradient
    is then taken in that dtype and read as float32 (the same numbers as the float32 output's gradient of the
    rounded values)."""
    if out_dtype is not None and not (out_dtype.is_floating_point and out_dtype.itemsize <= weight.dtype.itemsize):
        raise ValueError(f"rms_norm: out_dtype must be a floating dtype no wider than {weight.dtype}, not {out_dtype}")
    return _RMSNorm.apply(x, weight, eps, native, out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: str = "auto") -> torch.Tensor:
    """Public op: Llama's RMSNorm. ``impl``: 'auto' / 'torch' (the autograd Function above, saving x and rstd;
    'auto' through ``kernels.cpu_rms_norm`` for float32 CPU tensors where it runs), or 'reference' (transformers'
    ops)."""
    if impl == "reference":
        return rms_norm_reference(x, weight, eps)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    return rms_norm_with_rstd(x, weight, eps, native=impl == "auto")[0]
