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

``adapter_dtype=torch.bfloat16`` (bf16-mixed, where the base weight is bf16 already) also runs the adapter's own
products in bf16 (``_LoraLinearLow``): ``x A^T`` from the bf16 x the base product rounds anyway, ``g B``, and both
weight gradients ``g^T (x A^T)`` and ``(g B)^T x`` from the bf16 g the input gradient rounds anyway, each with
float32 accumulation inside the product and its [tokens, r] or [r, in] / [out, r] result rounded to bf16. The low-
rank product is still added to the float32 base output in float32 (``addmm_``; so a small update is never rounded
away against the base output, which is what bf16 autocast gets wrong), and so is its part of the input gradient;
the adapter weights, their gradients and the optimizer stay float32. The rank-r products read half the bytes and
run on the bf16 units: the [tokens, r] products are memory-bound, and in a training step each reads a tensor that
has left the cache. With ``stacked`` (``stack_weight``: W moved into the first rows of a [out + r, in] tensor, A
written into its last rows at each forward) ``x A^T`` comes out of the base product itself and the input
gradient's low-rank part goes into the base's, so that part is rounded to bf16 with the base part (it is a
gradient: the base part is rounded already). Measured on one SFT step of the bundled model
(``benchmarks/RESULTS.md``, "The share of the CPU's matrix-product peak"): 0.945x the CPU time for the bf16
products, 0.98x more for the stack, the loss curves within float32's seed spread.

Where ``kernels.cpu_lora_backward`` runs (bf16 ``low``, float32 adapters, AVX-512 BF16; its ``NATIVE`` flag), the
backward's ``g B`` and B's gradient come from one C pass over the bf16 g (B's gradient then not rounded to bf16).

Layering: reference (``lora_linear_reference``: everything in float32 through autograd, as peft computes it) ->
autograd Functions (``_LoraLinear``, ``_LoraLinearLow``) -> public op (``lora_linear`` with
``impl='auto'|'torch'``; ``torch`` is the reference's maths with the base product in the weight's dtype, through
autograd, and with the adapter products in ``adapter_dtype`` when given).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finetune_studio.kernels import cpu_lora_backward


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
    adapter_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The same maths as ``_LoraLinear`` (``_LoraLinearLow`` with ``adapter_dtype``), through autograd (peft's
    order: base, then the scaled low-rank part)."""
    out = _base(x, weight)
    if bias is not None:
        out = out + bias.to(x.dtype)
    if adapter_dtype is None:
        return out + F.linear(F.linear(x, lora_a), lora_b) * scaling
    xa = F.linear(x.to(adapter_dtype), lora_a.to(adapter_dtype)).to(x.dtype)  # its gradient rounded to low too
    return out + F.linear(xa, lora_b) * scaling


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


class _LoraLinearLow(torch.autograd.Function):
    """As ``_LoraLinear``, the rank-r products in ``low`` (bf16) with their results rounded to it; the sums with
    the base output and the base input gradient in x's dtype. With ``stacked`` (a [out + r, in] tensor in ``low``
    whose first ``out`` rows are W's storage), A is copied into its last r rows and ``x A^T`` comes out of the base
    product (one product of N = out + r), and the input gradient's low-rank part goes into the base's
    (``[g, s g B] [W; A]``, one product of K = out + r, rounded to bf16 with it)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        low: torch.dtype,
        stacked: torch.Tensor | None,
    ) -> torch.Tensor:
        n_in, n_out = weight.shape[1], weight.shape[0]
        acc = lora_b.dtype  # the output's dtype: x's, or float32 for an x in low already (stacked; see lora_linear)
        xl = x.reshape(-1, n_in).to(low)  # what the base product multiplies
        if stacked is None:
            out = F.linear(xl, weight.to(low)).to(acc)  # fresh, contiguous
            xa = xl @ lora_a.to(low).t()  # [N, r] in low
        else:
            stacked[n_out:].copy_(lora_a)  # (a Function's forward runs without gradients)
            full = F.linear(xl, stacked)  # [N, out + r]
            out = full[:, :n_out].to(acc)  # a fresh contiguous float32 tensor (the slice is not dense)
            xa = full[:, n_out:].contiguous()
            del full
        if bias is not None:
            out.add_(bias.to(out.dtype))
        out.addmm_(xa.to(acc), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b, stacked)
        ctx.scaling, ctx.low = scaling, low
        return out.view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, weight, lora_a, lora_b, stacked = ctx.saved_tensors
        s, low = ctx.scaling, ctx.low
        n_in, n_out, r = weight.shape[1], weight.shape[0], lora_a.shape[0]
        g = grad_out.reshape(-1, n_out)
        if stacked is None or not ctx.needs_input_grad[0]:
            gl = g.to(low)
            gcat = None
        else:
            gcat = torch.empty(g.shape[0], n_out + r, dtype=low, device=g.device)
            gcat[:, :n_out].copy_(g)
            gl = gcat[:, :n_out]
        grad_a = grad_b = grad_x = None
        if lora_b.dtype == torch.float32 and cpu_lora_backward.runs_on(gl, xa, r):  # one pass over gl (C)
            need_gb = ctx.needs_input_grad[3] or (ctx.needs_input_grad[0] and gcat is None)
            gb = torch.empty(g.shape[0], r, dtype=low) if need_gb else None
            scaled = gcat[:, n_out:] if gcat is not None and ctx.needs_input_grad[0] else None
            grad_b = cpu_lora_backward.lora_backward_products(
                gl, lora_b, xa if ctx.needs_input_grad[4] else None, s, scaled, gb
            )
            if ctx.needs_input_grad[3]:
                grad_a = (gb.t() @ x.reshape(-1, n_in).to(low)).to(lora_a.dtype).mul_(s)  # type: ignore[union-attr]
            if ctx.needs_input_grad[0]:
                if gcat is not None:
                    gx = gcat @ stacked
                else:
                    gx = (gl @ weight.to(low)).to(grad_out.dtype)
                    gx.addmm_(gb.to(gx.dtype), lora_a, alpha=s)  # type: ignore[union-attr]
                grad_x = gx.view(x.shape).to(x.dtype)
            return grad_x, None, None, grad_a, grad_b, None, None, None
        gb = gl @ lora_b.to(low)  # [N, r] in low
        if ctx.needs_input_grad[4]:
            grad_b = (gl.t() @ xa).to(lora_b.dtype).mul_(s)  # [out, r]
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x.reshape(-1, n_in).to(low)).to(lora_a.dtype).mul_(s)  # [r, in]
        if ctx.needs_input_grad[0]:
            if gcat is not None:
                torch.mul(gb, s, out=gcat[:, n_out:])
                gx = gcat @ stacked  # [N, in] in low: g W + s (g B) A in one product, rounded once; to x's dtype below
            else:
                gx = (gl @ weight.to(low)).to(grad_out.dtype)  # [N, in]
                gx.addmm_(gb.to(gx.dtype), lora_a, alpha=s)
            grad_x = gx.view(x.shape).to(x.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    impl: str = "auto",
    adapter_dtype: torch.dtype | None = None,
    stacked: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + b + scaling * (x @ A^T) @ B^T`` with W and b frozen; the base product in W's dtype.

    x [..., in] (float32 under bf16-mixed), weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r]
    in x's dtype. impl: ``auto`` (the autograd Function) or ``torch`` (autograd through the same maths).
    adapter_dtype: None (the adapter's products in x's dtype) or a 16-bit dtype for them (see the module doc; the
    base product then runs in it too, whatever W's dtype). stacked: with ``adapter_dtype``, a [out + r, in] tensor
    in it whose first ``out`` rows share W's storage (``stack_weight``): A is written into its last rows and
    multiplied with the base product (see ``_LoraLinearLow``). With ``stacked``, x may come in ``adapter_dtype``
    already (float32 adapters): the same numbers as for the float32 x it was rounded from, the output in float32
    and x's gradient in ``adapter_dtype`` (the product's result, not widened)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    # x in adapter_dtype already (float32 adapters, a stack): its values are what the base product rounds x to
    # anyway, so the numbers are those of the float32 x it was rounded from, the input gradient in adapter_dtype
    low_input = stacked is not None and impl == "auto" and x.dtype == adapter_dtype and lora_a.dtype == torch.float32
    if not low_input and (lora_a.dtype != x.dtype or lora_b.dtype != x.dtype):
        raise ValueError(f"lora_linear: the adapter weights must be in x's dtype ({x.dtype})")
    if low_input and lora_b.dtype != lora_a.dtype:
        raise ValueError("lora_linear: lora_a and lora_b must have one dtype")
    if adapter_dtype is not None and adapter_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"lora_linear: adapter_dtype must be a 16-bit dtype or None, not {adapter_dtype}")
    if adapter_dtype == x.dtype and not low_input:
        adapter_dtype = None
    if impl == "torch":
        if adapter_dtype is not None:
            weight = weight.to(adapter_dtype)
        return _lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling, adapter_dtype)
    if impl != "auto":
        raise ValueError(f"lora_linear: impl must be 'auto' or 'torch', not {impl!r}")
    if adapter_dtype is not None:
        if stacked is not None and not _stacks(stacked, weight, lora_a, adapter_dtype):
            raise ValueError("lora_linear: stacked must be [out + r, in] in adapter_dtype, its first rows W itself")
        low: torch.Tensor = _LoraLinearLow.apply(
            x, weight, bias, lora_a, lora_b, float(scaling), adapter_dtype, stacked
        )
        return low
    out: torch.Tensor = _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
    return out


def stack_weight(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """A [out + rank, in] tensor in W's dtype whose first ``out`` rows hold W (copied); assign
    ``weight.data = stacked[:out]`` to make W a view of it, then pass it to ``lora_linear(stacked=...)``."""
    stacked = torch.empty(weight.shape[0] + rank, weight.shape[1], dtype=weight.dtype, device=weight.device)
    stacked[: weight.shape[0]].copy_(weight)
    stacked[weight.shape[0] :].zero_()
    return stacked


def _stacks(stacked: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, low: torch.dtype) -> bool:
    """``stacked`` is [out + r, in] in ``low`` and its first rows are W's own storage."""
    return (
        stacked.dtype == low
        and weight.dtype == low
        and stacked.is_contiguous()
        and weight.is_contiguous()
        and tuple(stacked.shape) == (weight.shape[0] + lora_a.shape[0], weight.shape[1])
        and stacked.data_ptr() == weight.data_ptr()
    )
