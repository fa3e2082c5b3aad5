"""Several LoRA linears that read one input (q/k/v, gate/up) as one bf16 product each way, in one autograd node.

bf16-mixed runs each LoRA linear through ``kernels.lora_linear`` with A stacked under its frozen W (``[W; A]``,
one bf16 product each way). q, k and v of an attention block read the same input, and so do gate and up of a
SwiGLU MLP: one at a time, each rounds that input to bf16 again (three / two casts of a [tokens, hidden] tensor),
runs its own narrow product (k and v of the bundled model: 192 + 16 outputs, well below the CPU's bf16 peak) and
its own autograd node and Python, and in backward each gives its own input gradient, which autograd then sums.
``grouped_lora_linear`` does the group's work at once over one [sum(out_i + r_i), in] bf16 tensor holding each
member's ``[W_i; A_i]`` one after the other (``stack_group``; each member's W a view of its rows, so nothing is
copied): x is rounded once, ``x [W_1; A_1; W_2; A_2; ...]^T`` is one product whose columns hold each member's
base output and ``x A_i^T``, and the input gradient is one product ``[g_1, s_1 g_1 B_1, g_2, ...] [W_1; A_1; ...]``
(K = sum(out_i + r_i)); the A gradients are one product ``[g_1 B_1, g_2 B_2, ...]^T x`` too.

Per member, everything else is ``kernels.lora_linear``'s ``_LoraLinearLow`` with a stack: the member's base output
and ``x A_i^T`` come out of the same dot products (bit for bit, the wider product computes each entry alike), its
output is cast to float32 and the low-rank product added in float32 (so a small update is never rounded away), B's
and A's gradients from bf16 operands with float32 accumulation, each scaled in float32. The one difference: the
members' input gradients are summed inside one bf16 product (float32 accumulation, one rounding to bf16) instead
of being rounded to bf16 each and summed in float32: the same sum to bf16 rounding, rounded once instead of three
times. Kept for backward: x (the float32 input, as each member kept it, or a bf16 one: see ``grouped_lora_linear``;
``kernels.recompute`` may replace it), the [tokens, sum r_i] bf16 ``x A_i^T`` (the members' [tokens, r_i] ones side
by side) and the weights; the outputs
are each member's own fresh tensor, as before (a view of one buffer would keep all of it alive as long as any
one member's output is kept).

Where ``kernels.cpu_lora_backward`` runs (AVX-512 BF16, bf16 stack, float32 adapters; its ``NATIVE`` flag), each
member's ``g_i B_i`` and B's gradient come from one C pass over g_i instead of two torch products that each read
it: the same float32 sums in another order, ``s_i g_i B_i`` rounded to bf16 once, B's gradient never rounded to bf16.

Layering: reference (``grouped_lora_linear_reference``: each member through ``lora_linear_reference``, float32)
-> autograd Function (``_GroupedLoraLinear``) -> public op (``grouped_lora_linear``, which checks its arguments).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finetune_studio.kernels import cpu_lora_backward
from finetune_studio.kernels.lora_linear import lora_linear_reference


def grouped_lora_linear_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> tuple[torch.Tensor, ...]:
    """Eager float32 reference: each member's ``x @ W_i^T + b_i + s_i * (x @ A_i^T) @ B_i^T``."""
    return tuple(
        lora_linear_reference(x, w, b, a, bb, s)
        for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings, strict=True)
    )


def rows_of(stacked: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """``stacked[start : start + rows]`` (a contiguous 2-D tensor) as a tensor of its own over the same memory, with
    its own version counter: a member's ``[W; A]`` that ``kernels.lora_linear`` writes A into at each forward
    without marking the other members' saved tensors (views of ``stacked`` would share its counter) as changed."""
    if stacked.dim() != 2 or not stacked.is_contiguous():
        raise ValueError("rows_of: stacked must be a contiguous 2-D tensor")
    if start < 0 or rows < 0 or start + rows > stacked.shape[0]:
        raise ValueError(f"rows_of: rows {start}..{start + rows} are outside the {stacked.shape[0]} rows")
    cols = stacked.shape[1]
    out = torch.empty(0, dtype=stacked.dtype, device=stacked.device)
    with torch.no_grad():
        out.set_(stacked.untyped_storage(), stacked.storage_offset() + start * cols, (rows, cols), (cols, 1))
    return out


def stack_group(weights: Sequence[torch.Tensor], ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One [sum(out_i + r_i), in] tensor in the weights' dtype holding ``[W_1; 0; W_2; 0; ...]`` (each W_i copied,
    r_i zero rows after it, A_i's place), and each member's ``[W_i; A_i]`` rows (``rows_of``): pass the first to
    ``grouped_lora_linear``, and make each W_i a view of its rows (``weight.data = member[:out_i]``) so that the
    group costs r_i rows a member and no copy of W; a member's rows also serve ``lora_linear(stacked=...)``."""
    if not weights or len(weights) != len(ranks):
        raise ValueError("stack_group: one rank per weight, at least one weight")
    first = weights[0]
    if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype for w in weights):
        raise ValueError("stack_group: the weights must be 2-D with one input width and one dtype")
    rows = [w.shape[0] + r for w, r in zip(weights, ranks, strict=True)]
    stacked = torch.zeros(sum(rows), first.shape[1], dtype=first.dtype, device=first.device)
    members, start = [], 0
    with torch.no_grad():
        for w, n in zip(weights, rows, strict=True):
            stacked[start : start + w.shape[0]].copy_(w)
            members.append(rows_of(stacked, start, n))
            start += n
    return stacked, members


class _GroupedLoraLinear(torch.autograd.Function):
    """Each member's ``(x_l W_i^T)_x + b_i + s_i (x_l A_i^T)_x B_i^T`` from one product ``x_l S^T`` (S the group's
    stack, A_i written into it); gradients for x, each A_i and each B_i (see the module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        stacked: torch.Tensor,
        layout: tuple[tuple[int, int], ...],
        biases: tuple[torch.Tensor | None, ...],
        scalings: tuple[float, ...],
        *adapters: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = len(layout)
        lora_as, lora_bs = adapters[:n], adapters[n:]
        n_in, wide = stacked.shape[1], adapters[0].dtype  # the outputs' dtype: x's, or float32 for a bf16 x
        start = 0
        for (out, r), a in zip(layout, lora_as):
            stacked[start + out : start + out + r].copy_(a)  # (a Function's forward runs without gradients)
            start += out + r
        full = F.linear(x.reshape(-1, n_in).to(stacked.dtype), stacked)  # [N, sum(out_i + r_i)]
        outs, xas, col = [], [], 0
        for out, r in layout:
            outs.append(full[:, col : col + out].to(wide))  # each a fresh contiguous tensor
            xas.append(full[:, col + out : col + out + r])
            col += out + r
        xa = torch.cat(xas, 1)  # [N, sum r_i] in bf16, contiguous: what backward keeps
        del full, xas
        xa_x, rc = xa.to(wide), 0
        for y, (_, r), bias, b, s in zip(outs, layout, biases, lora_bs, scalings):
            if bias is not None:
                y.add_(bias.to(y.dtype))
            y.addmm_(xa_x[:, rc : rc + r], b.t(), alpha=s)
            rc += r
        ctx.save_for_backward(x, xa, stacked, *lora_bs)
        ctx.layout, ctx.scalings = layout, scalings
        lead = x.shape[:-1]
        return tuple(y.view(*lead, out) for y, (out, _) in zip(outs, layout))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, stacked, *lora_bs = ctx.saved_tensors
        layout, n_in = ctx.layout, stacked.shape[1]
        n = len(layout)
        rows = x.numel() // n_in
        gcat = torch.empty(rows, stacked.shape[0], dtype=stacked.dtype, device=stacked.device)
        col = 0
        for (out, r), g in zip(layout, grads):
            gcat[:, col : col + out].view(g.shape).copy_(g)  # g rounded to bf16 (as each member's was), in one pass
            col += out + r
        grad_x, grad_as, grad_bs = grouped_backward_products(
            gcat,
            x,
            xa,
            stacked,
            layout,
            lora_bs,
            ctx.scalings,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[5 : 5 + n],
            ctx.needs_input_grad[5 + n : 5 + 2 * n],
        )
        return (grad_x, None, None, None, None, *grad_as, *grad_bs)


def grouped_backward_products(
    gcat: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    stacked: torch.Tensor,
    layout: Sequence[tuple[int, int]],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    need_x: bool,
    need_a: Sequence[bool],
    need_b: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The group's backward products once each member's output gradient g_i, rounded to the stack's dtype, is in its
    columns of ``gcat`` ([tokens, sum(out_i + r_i)], the other columns free): (the input gradient in x's dtype, each
    A's gradient, each B's gradient, in the adapters' dtype; None where not needed). Writes ``s_i g_i B_i`` into the
    columns after each g_i. x [..., in] (as the forward read it), xa the forward's [tokens, sum r_i] ``x A_i^T``."""
    low, n_in, n = stacked.dtype, stacked.shape[1], len(layout)
    # each member's g_i B_i and B's gradient from one C pass over g_i where it runs (``kernels.cpu_lora_backward``:
    # s_i g_i B_i rounded once, B's gradient not rounded to bf16 first), else two products
    native = lora_bs[0].dtype == torch.float32 and cpu_lora_backward.runs_on(gcat, xa, max(r for _, r in layout))
    grad_bs: list[torch.Tensor | None] = [None] * n
    gball = torch.empty(gcat.shape[0], xa.shape[1], dtype=low, device=gcat.device) if any(need_a) else None
    col, rc = 0, 0
    for i, ((out, r), b, s) in enumerate(zip(layout, lora_bs, scalings)):
        gl = gcat[:, col : col + out]
        if native:
            grad_bs[i] = cpu_lora_backward.lora_backward_products(
                gl,
                b,
                xa[:, rc : rc + r] if need_b[i] else None,
                s,
                gcat[:, col + out : col + out + r] if need_x else None,
                None if gball is None else gball[:, rc : rc + r],
            )
        else:
            gb = gl @ b.to(low)  # [N, r] in bf16
            if need_b[i]:
                grad_bs[i] = (gl.t() @ xa[:, rc : rc + r]).to(b.dtype).mul_(s)  # [out, r]
            if need_x:
                torch.mul(gb, s, out=gcat[:, col + out : col + out + r])
            if gball is not None:
                gball[:, rc : rc + r].copy_(gb)
        col += out + r
        rc += r
    grad_as: list[torch.Tensor | None] = [None] * n
    if gball is not None:
        ga = (gball.t() @ x.reshape(-1, n_in).to(low)).to(lora_bs[0].dtype)  # [sum r_i, in]: every A's
        rc = 0
        for i, ((_, r), s) in enumerate(zip(layout, scalings)):
            if need_a[i]:
                grad_as[i] = ga[rc : rc + r].mul_(s)
            rc += r
    grad_x = (gcat @ stacked).to(x.dtype).view(x.shape) if need_x else None  # sum_i g_i W_i + s_i (g_i B_i) A_i
    return grad_x, grad_as, grad_bs


def member_layout(
    op: str,
    x: torch.Tensor,
    stacked: torch.Tensor,
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
) -> list[tuple[int, int]]:
    """Each member's (out_i, r_i), after checking what every grouped node needs of its arguments (a ValueError that
    names ``op`` otherwise): the adapter weights in one floating dtype, each A [r, in] and its B [out, r], each bias
    [out] or None, and the stack's sum(out_i + r_i) rows."""
    wide = lora_as[0].dtype
    layout = []
    for a, b, bias in zip(lora_as, lora_bs, biases, strict=True):
        if a.dtype != wide or b.dtype != wide or not wide.is_floating_point:
            raise ValueError(f"{op}: the adapter weights must all be in one floating dtype ({wide})")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] or b.shape[1] != a.shape[0]:
            raise ValueError(f"{op}: each A must be [r, in] and its B [out, r]")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise ValueError(f"{op}: each bias must be [out] or None")
        layout.append((b.shape[0], a.shape[0]))
    if sum(out + r for out, r in layout) != stacked.shape[0]:
        raise ValueError(f"{op}: stacked must have sum(out_i + r_i) rows")
    return layout


def grouped_lora_linear(
    x: torch.Tensor,
    stacked: torch.Tensor,
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> tuple[torch.Tensor, ...]:
    """Each member's ``x @ W_i^T + b_i + s_i * (x @ A_i^T) @ B_i^T``, through one product each way.

    x [..., in] (float32 under bf16-mixed, or already in the stack's dtype); stacked: the group's frozen
    [sum(out_i + r_i), in] tensor in a 16-bit dtype (``stack_group``), member i's W_i in its rows from
    sum_{j<i}(out_j + r_j), followed by r_i rows that take A_i at each forward; biases [out_i] or None (frozen);
    lora_as [r_i, in], lora_bs [out_i, r_i] in one dtype, x's or (x in the stack's dtype) a wider one; scalings s_i.
    Returns one [..., out_i] tensor in the adapters' dtype per member. x's gradient is in x's dtype: for a bf16 x
    the bf16 product's result itself (what a float32 x of the same values gets, cast to float32); x is not cast
    either way (a float32 x of bf16 values gives the same numbers, with the casts)."""
    n = len(lora_as)
    if n == 0 or not (len(biases) == len(lora_bs) == len(scalings) == n):
        raise ValueError("grouped_lora_linear: one bias (or None), A, B and scaling per member, at least one member")
    if stacked.requires_grad or any(b is not None and b.requires_grad for b in biases):
        raise ValueError("grouped_lora_linear: the stacked weights and the biases must be frozen")
    if stacked.dtype not in (torch.bfloat16, torch.float16) or stacked.dim() != 2 or not stacked.is_contiguous():
        raise ValueError("grouped_lora_linear: stacked must be a contiguous 2-D tensor in a 16-bit dtype")
    if stacked.shape[1] != x.shape[-1]:
        raise ValueError(f"grouped_lora_linear: stacked takes {stacked.shape[1]} inputs, x has {x.shape[-1]}")
    wide = lora_as[0].dtype
    if wide != x.dtype and x.dtype != stacked.dtype:
        raise ValueError(
            f"grouped_lora_linear: the adapter weights must be in x's dtype ({x.dtype}) or x in the stack's"
        )
    layout = member_layout("grouped_lora_linear", x, stacked, biases, lora_as, lora_bs)
    outs: tuple[torch.Tensor, ...] = _GroupedLoraLinear.apply(
        x, stacked, tuple(layout), tuple(biases), tuple(float(s) for s in scalings), *lora_as, *lora_bs
    )
    return outs
