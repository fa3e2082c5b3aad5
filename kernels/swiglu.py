"""SwiGLU, ``silu(gate) * up``, saving only its two inputs for backward.

Transformers' Llama MLP computes ``act_fn(gate) * up`` as two autograd ops, which keep ``gate`` (for SiLU's
backward), ``silu(gate)`` and ``up`` (for the product's): three tensors of the MLP's width per token. This op keeps
``gate`` and ``up`` and recomputes ``silu(gate)`` in backward (an elementwise op, cheap next to the matrix products):

    h = silu(g) * u,   silu(g) = g * sigmoid(g)
    dL/du = dL/dh * silu(g)
    dL/dg = dL/dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))   (aten's silu_backward, as autograd computes it)

In the input dtype, as transformers computes it (bfloat16 in, bfloat16 out), so the numbers match it exactly
(``impl='torch'``). ``impl='auto'`` sends float32 CPU tensors through ``kernels.cpu_swiglu`` where it runs (AVX-512:
one pass each way instead of two forward and four backward; within 4e-7 relative of torch's numbers, not bit for
bit), the rest through torch's ops; ``NATIVE = False`` keeps everything on torch's ops (for comparisons).

``out_dtype=torch.bfloat16`` (float32 gate and up): h rounded to bf16 once, and its gradient taken in bf16, for a
consumer that rounds h to bf16 anyway and whose input gradient is a bf16 product's result (bf16-mixed's stacked
``down_proj``, ``engine.train.model_patches.fused_ops``): the same numbers as ``swiglu(...).to(torch.bfloat16)``
with the gradient widened to float32, bit for bit, without the two [tokens, width] casts (the native kernel rounds
as it writes h and widens dh as it reads it). ``BF16_IO = False`` makes the MLP keep the float32 h (for A/Bs).

Layering: reference (``swiglu_reference``) -> autograd Function (``_SwiGLU``) -> public op (``swiglu`` with
``impl='auto'|'torch'|'reference'``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune_studio.kernels import cpu_swiglu

NATIVE = True  # impl='auto' sends float32 CPU tensors through kernels.cpu_swiglu where it runs
BF16_IO = True  # fused_ops' MLP asks for a bf16 h (out_dtype) where down_proj rounds h to bf16 anyway


def _native(impl: str, *tensors: torch.Tensor) -> bool:
    return impl == "auto" and NATIVE and cpu_swiglu.runs_on(*tensors)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager reference: transformers' ``ACT2FN['silu'](gate) * up`` (autograd keeps gate, silu(gate) and up)."""
    return F.silu(gate) * up


def _forward(gate: torch.Tensor, up: torch.Tensor, native: bool, out_dtype: torch.dtype | None) -> torch.Tensor:
    if out_dtype is None or out_dtype == gate.dtype:
        return cpu_swiglu.swiglu_forward_native(gate, up) if native else F.silu(gate) * up
    if native and out_dtype == torch.bfloat16 and cpu_swiglu.bf16_available():
        return cpu_swiglu.swiglu_forward_native_bf16(gate, up)  # the float32 h rounded once, as .to() does
    return _forward(gate, up, native, None).to(out_dtype)


def swiglu_forward(
    gate: torch.Tensor, up: torch.Tensor, impl: str = "auto", out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The product without a graph (what backward and a recompute need): the same numbers as ``swiglu`` with the
    same ``impl`` and ``out_dtype``."""
    with torch.no_grad():
        return _forward(gate, up, _native(impl, gate, up), out_dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, native=False, out_dtype=None):
        ctx.save_for_backward(gate, up)
        ctx.native = native
        return _forward(gate, up, native, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        if grad.dtype != gate.dtype:  # a bf16 h's gradient (out_dtype): widened exactly, read as such by the kernel
            if (
                ctx.native
                and grad.dtype == torch.bfloat16
                and cpu_swiglu.bf16_available()
                and cpu_swiglu.runs_on(gate, up)
                and grad.shape == gate.shape
            ):
                native_gate, native_up = cpu_swiglu.swiglu_backward_native_bf16(grad, gate, up)
                return (native_gate if wanted[0] else None), (native_up if wanted[1] else None), None, None
            grad = grad.to(gate.dtype)
        if ctx.native and cpu_swiglu.runs_on(grad, gate, up):
            native_gate, native_up = cpu_swiglu.swiglu_backward_native(grad, gate, up)
            return (native_gate if wanted[0] else None), (native_up if wanted[1] else None), None, None
        d_gate: torch.Tensor | None = None
        d_up: torch.Tensor | None = None
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            d_up = grad * F.silu(gate)
        return d_gate, d_up, None, None


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto", out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Public op: ``silu(gate) * up``. ``impl``: 'auto' / 'torch' (the autograd Function above, saving gate and
    up; 'auto' through ``kernels.cpu_swiglu`` for float32 CPU tensors where it runs), or 'reference'
    (transformers' two ops, for comparison). ``out_dtype``: None (gate's dtype) or a narrower dtype h is rounded
    to (its gradient comes in that dtype too; see the module doc)."""
    if impl == "reference":
        out = swiglu_reference(gate, up)
        return out if out_dtype is None else out.to(out_dtype)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up differ: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    if out_dtype is not None and not (out_dtype.is_floating_point and out_dtype.itemsize <= gate.dtype.itemsize):
        raise ValueError(f"out_dtype must be a floating dtype no wider than {gate.dtype}, not {out_dtype}")
    return _SwiGLU.apply(gate, up, _native(impl, gate, up), out_dtype)
