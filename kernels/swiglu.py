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

Layering: reference (``swiglu_reference``) -> autograd Function (``_SwiGLU``) -> public op (``swiglu`` with
``impl='auto'|'torch'|'reference'``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune_studio.kernels import cpu_swiglu

NATIVE = True  # impl='auto' sends float32 CPU tensors through kernels.cpu_swiglu where it runs


def _native(impl: str, *tensors: torch.Tensor) -> bool:
    return impl == "auto" and NATIVE and cpu_swiglu.runs_on(*tensors)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager reference: transformers' ``ACT2FN['silu'](gate) * up`` (autograd keeps gate, silu(gate) and up)."""
    return F.silu(gate) * up


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """The product without a graph (what backward and a recompute need): the same numbers as ``swiglu`` with the
    same ``impl``."""
    with torch.no_grad():
        if _native(impl, gate, up):
            return cpu_swiglu.swiglu_forward_native(gate, up)
        return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, native=False):
        ctx.save_for_backward(gate, up)
        ctx.native = native
        if native:
            return cpu_swiglu.swiglu_forward_native(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        if ctx.native and cpu_swiglu.runs_on(grad, gate, up):
            native_gate, native_up = cpu_swiglu.swiglu_backward_native(grad, gate, up)
            wanted = ctx.needs_input_grad
            return (native_gate if wanted[0] else None), (native_up if wanted[1] else None), None
        d_gate: torch.Tensor | None = None
        d_up: torch.Tensor | None = None
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            d_up = grad * F.silu(gate)
        return d_gate, d_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Public op: ``silu(gate) * up``. ``impl``: 'auto' / 'torch' (the autograd Function above, saving gate and
    up; 'auto' through ``kernels.cpu_swiglu`` for float32 CPU tensors where it runs), or 'reference'
    (transformers' two ops, for comparison)."""
    if impl == "reference":
        return swiglu_reference(gate, up)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up differ: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    return _SwiGLU.apply(gate, up, _native(impl, gate, up))
