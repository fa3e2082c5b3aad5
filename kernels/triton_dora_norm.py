"""Triton kernels for ``dora_norm.dora_weight_norm``: ``M = W + s B A`` lives only in register tiles.

Forward, one program per block of ``BLOCK_O`` output rows: ``B[rows]`` ([BLOCK_O, R], the rank padded to a
power of two of at least 16) stays loaded while the program walks the input columns in ``BLOCK_I`` tiles,
forms ``M = W[rows, cols] + s * B[rows] @ A[:, cols]`` in float32 and sums its squares per row.

Backward, the same walk with ``G = (g / n)[:, None] * M``: ``grad_B[rows] = s * sum_cols G @ A[:, cols].T``
accumulates in registers; ``grad_A[:, cols] += s * B[rows].T @ G`` is a float32 atomic add across the row
blocks (so its last bits vary from run to run). All products are float32 (the rank is small: reading W is the
cost, not the arithmetic).

Layering: kernels -> launchers (``forward``, ``backward``) -> autograd Function (``TritonDoraNorm``); the public
op is ``dora_norm.dora_weight_norm(impl='triton')``. This module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
# tile sizes and launch settings: first guesses, small enough for the 99 KiB of shared memory of consumer GPUs
DEFAULT_BLOCKS = {"block_o": 64, "block_i": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _m_tile(w_ptr, a_ptr, b, rows, cols, rk, row_ok, col_ok, r_ok, stride_wo, stride_wi, stride_ar, stride_ai, scaling):
    """W[rows, cols] + s * B[rows] @ A[:, cols] in float32 (zero outside the matrix), and the A tile."""
    a = tl.load(a_ptr + rk[:, None] * stride_ar + cols[None, :] * stride_ai, r_ok[:, None] & col_ok[None, :], 0.0)
    a = a.to(tl.float32)
    w = tl.load(w_ptr + rows[:, None] * stride_wo + cols[None, :] * stride_wi, row_ok[:, None] & col_ok[None, :], 0.0)
    return w.to(tl.float32) + scaling * tl.dot(b, a, input_precision="ieee"), a


@triton.jit
def _forward_kernel(
    w_ptr, a_ptr, b_ptr, n_ptr, OUT, IN, RANK, stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br,
    scaling, R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)  # 64-bit: out x in may pass 2**31
    row_ok = rows < OUT
    rk = tl.arange(0, R)
    r_ok = rk < RANK
    b = tl.load(b_ptr + rows[:, None] * stride_bo + rk[None, :] * stride_br, row_ok[:, None] & r_ok[None, :], 0.0)
    b = b.to(tl.float32)
    sumsq = tl.zeros((BLOCK_O,), tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        col_ok = cols < IN
        m, _ = _m_tile(
            w_ptr, a_ptr, b, rows, cols, rk, row_ok, col_ok, r_ok, stride_wo, stride_wi, stride_ar, stride_ai, scaling
        )
        sumsq += tl.sum(m * m, 1)
    tl.store(n_ptr + rows, tl.sqrt(sumsq), row_ok)


@triton.jit
def _backward_kernel(
    w_ptr, a_ptr, b_ptr, n_ptr, g_ptr, ga_ptr, gb_ptr, OUT, IN, RANK, stride_wo, stride_wi, stride_ar, stride_ai,
    stride_bo, stride_br, scaling, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
    R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    row_ok = rows < OUT
    rk = tl.arange(0, R)
    r_ok = rk < RANK
    b = tl.load(b_ptr + rows[:, None] * stride_bo + rk[None, :] * stride_br, row_ok[:, None] & r_ok[None, :], 0.0)
    b = b.to(tl.float32)
    norm = tl.load(n_ptr + rows, row_ok, 0.0)
    grad = tl.load(g_ptr + rows, row_ok, 0.0)
    coef = tl.where(norm > 0, grad / tl.where(norm > 0, norm, 1.0), 0.0)  # an all-zero row has subgradient 0
    grad_b = tl.zeros((BLOCK_O, R), tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        col_ok = cols < IN
        m, a = _m_tile(
            w_ptr, a_ptr, b, rows, cols, rk, row_ok, col_ok, r_ok, stride_wo, stride_wi, stride_ar, stride_ai, scaling
        )
        g = coef[:, None] * m  # zero on padded rows (coef 0) and padded columns (m 0)
        if NEED_B:
            grad_b += tl.dot(g, tl.trans(a), input_precision="ieee")
        if NEED_A:
            part = scaling * tl.dot(tl.trans(b), g, input_precision="ieee")  # [R, BLOCK_I]
            tl.atomic_add(ga_ptr + rk[:, None] * IN + cols[None, :], part, r_ok[:, None] & col_ok[None, :])
    if NEED_B:
        tl.store(gb_ptr + rows[:, None] * RANK + rk[None, :], scaling * grad_b, row_ok[:, None] & r_ok[None, :])


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs every side of at least 16


def _check(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    bad = [t.dtype for t in (weight, lora_A, lora_B) if t.dtype not in SUPPORTED]
    if bad:
        raise ValueError(
            f"the Triton DoRA-norm kernel takes float32, bfloat16 or float16, not {bad[0]}; use impl='chunked'"
        )


def forward(weight, lora_A, lora_B, scaling, *, block_o, block_i, num_warps=4, num_stages=2):
    out_f, in_f = weight.shape
    rank = lora_A.shape[0]
    norm = torch.empty(out_f, dtype=torch.float32, device=weight.device)
    if out_f == 0:
        return norm
    _forward_kernel[(triton.cdiv(out_f, block_o),)](
        weight, lora_A, lora_B, norm, out_f, in_f, rank, *weight.stride(), *lora_A.stride(), *lora_B.stride(),
        scaling, R=_rank_block(rank), BLOCK_O=block_o, BLOCK_I=block_i,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    return norm


def backward(
    weight, lora_A, lora_B, norm, grad, scaling, need_a, need_b, *, block_o, block_i, num_warps=4, num_stages=2
):
    out_f, in_f = weight.shape
    rank = lora_A.shape[0]
    grad_a = torch.zeros(rank, in_f, dtype=torch.float32, device=weight.device) if need_a else None
    grad_b = torch.zeros(out_f, rank, dtype=torch.float32, device=weight.device) if need_b else None
    if out_f and (need_a or need_b):
        _backward_kernel[(triton.cdiv(out_f, block_o),)](
            weight, lora_A, lora_B, norm, grad.float().contiguous(),
            grad_a if grad_a is not None else norm, grad_b if grad_b is not None else norm,
            out_f, in_f, rank, *weight.stride(), *lora_A.stride(), *lora_B.stride(), scaling,
            NEED_A=need_a, NEED_B=need_b, R=_rank_block(rank), BLOCK_O=block_o, BLOCK_I=block_i,
            num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
        )  # fmt: skip
    return (
        grad_a.to(lora_A.dtype) if grad_a is not None else None,
        grad_b.to(lora_B.dtype) if grad_b is not None else None,
    )


class TritonDoraNorm(torch.autograd.Function):
    """The DoRA row norm with both passes in Triton; saves the [out] norm and the inputs, nothing weight-sized."""

    @staticmethod
    def forward(ctx, weight, lora_A, lora_B, scaling, blocks):
        _check(weight, lora_A, lora_B)
        norm = forward(weight, lora_A, lora_B, scaling, **blocks)
        ctx.save_for_backward(weight, lora_A, lora_B, norm)
        ctx.scaling, ctx.blocks = scaling, blocks
        return norm

    @staticmethod
    def backward(ctx, grad):
        weight, lora_A, lora_B, norm = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_a, grad_b = backward(weight, lora_A, lora_B, norm, grad, ctx.scaling, need_a, need_b, **ctx.blocks)
        return None, grad_a, grad_b, None, None
