"""Triton kernels for ``token_logprobs``: the output head and log-softmax gather fused, no [N, V] logits.

Forward, one program per block of ``BLOCK_N`` rows and split of the vocabulary (splits keep the GPU busy when
there are few rows); for each vocabulary block of its split, the logits tile
``hidden[rows] @ weight[cols].T`` is accumulated in float32 over hidden blocks, then folded into an online
log-sum-exp (running max ``m`` and sum ``s``: ``s <- s * exp(m - m') + sum exp(l - m')``) and the target's
logit is picked out. The launcher folds the splits: ``lse = logsumexp_k (m_k + log s_k)``, ``logp = l[t] - lse``,
and saves ``lse`` [N] for backward.

Backward, one program per (row block, vocab block): the tile's logits are recomputed, and with
``g = grad_out * (onehot(t) - exp(l - lse))`` (times ``1 - tanh^2`` under a softcap) the program adds
``g @ weight[cols]`` into ``grad_hidden[rows]`` and ``g.T @ hidden[rows]`` into ``grad_weight[cols]``
(float32 atomic adds, so the summation order, and the last bits, vary from run to run).

Layering: kernels (``_forward_kernel``, ``_backward_kernel``) -> launchers (``forward``, ``backward``) ->
autograd Function (``TritonLogprobs``); the public op is ``linear_logprobs.token_logprobs(impl='triton')``.
This module imports triton: import it only once ``selection.require_triton`` has passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from finetune_studio.kernels.selection import interpreting

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
# tile sizes and launch settings (``splits``: vocabulary splits of the forward, None: enough to fill the GPU);
# first guesses, to be tuned with benchmarks/kernels_bench.py --sweep on a GPU
DEFAULT_BLOCKS = {"block_n": 64, "block_v": 128, "block_h": 64, "splits": None, "num_warps": 4, "num_stages": 2}
# float32 tiles take twice the shared memory: a narrower hidden block keeps them under consumer GPUs' 99 KiB
FLOAT32_BLOCKS = {"block_h": 32}


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows, cols, H, stride_hn, stride_hh, stride_wv, stride_wh, row_ok, col_ok,
    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, BLOCK_V] float32 logits hidden[rows] @ weight[cols].T; zero outside the matrix."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh, row_ok[:, None] & k_ok[None, :], 0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wh, k_ok[:, None] & col_ok[None, :], 0.0)
        if DOT_F32:  # the interpreter's dot multiplies bfloat16 bit patterns; on a GPU this is the same product
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _softcapped(raw, softcap, HAS_SOFTCAP: tl.constexpr):
    """(logits, tanh(raw / softcap)): softcap * tanh(raw / softcap), or raw itself without a softcap."""
    logits = raw
    th = raw
    if HAS_SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * raw / softcap) - 1.0  # tanh(raw / softcap)
        logits = softcap * th
    return logits, th


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, pick_ptr, N, V, H, V_PER_SPLIT,
    stride_hn, stride_hh, stride_wv, stride_wh, softcap,
    HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Program (row block, split): running max, sum and target logit over the split's vocabulary range."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    split = tl.program_id(1)
    target = tl.load(t_ptr + rows, row_ok, 0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    picked = tl.zeros((BLOCK_N,), tl.float32)
    v_start = split * V_PER_SPLIT
    for v0 in range(v_start, tl.minimum(v_start + V_PER_SPLIT, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        raw = _logits_tile(
            h_ptr, w_ptr, rows, cols, H, stride_hn, stride_hh, stride_wv, stride_wh, row_ok, col_ok,
            IEEE, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        logits, _ = _softcapped(raw, softcap, HAS_SOFTCAP)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))  # finite: every block holds at least one real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), 1)
    at = split * N + rows  # the [splits, N] partial results
    tl.store(m_ptr + at, m, row_ok)
    tl.store(s_ptr + at, s, row_ok)
    tl.store(pick_ptr + at, picked, row_ok)


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, t_ptr, lse_ptr, go_ptr, gh_ptr, gw_ptr, N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh, softcap,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # 64-bit offsets: V x H may pass 2**31
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < V
    raw = _logits_tile(
        h_ptr, w_ptr, rows, cols, H, stride_hn, stride_hh, stride_wv, stride_wh, row_ok, col_ok,
        IEEE, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    logits, th = _softcapped(raw, softcap, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, row_ok, 0.0)
    target = tl.load(t_ptr + rows, row_ok, 0)
    grad_out = tl.load(go_ptr + rows, row_ok, 0.0)
    onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    g = (onehot - tl.exp(logits - lse[:, None])) * grad_out[:, None]  # d loss / d logits
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    g = g.to(h_ptr.dtype.element_ty)  # the matmuls below run in the input precision, accumulating in float32
    if DOT_F32:
        g = g.to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        if NEED_H:
            w = tl.load(
                w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh, col_ok[:, None] & k_ok[None, :], 0.0
            )
            if DOT_F32:
                w = w.to(tl.float32)
            if IEEE:
                dh = tl.dot(g, w, input_precision="ieee")
            else:
                dh = tl.dot(g, w)
            tl.atomic_add(gh_ptr + rows[:, None] * H + ks[None, :], dh, row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            h = tl.load(
                h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh, row_ok[:, None] & k_ok[None, :], 0.0
            )
            if DOT_F32:
                h = h.to(tl.float32)
            if IEEE:
                dw = tl.dot(tl.trans(g), h, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(g), h)
            tl.atomic_add(gw_ptr + cols[:, None] * H + ks[None, :], dw, col_ok[:, None] & k_ok[None, :])


def _flags(hidden: torch.Tensor) -> dict:
    # float32 inputs get IEEE products unless PyTorch itself allows TF32 for matmuls (it does not by default)
    ieee = hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {"IEEE": ieee, "DOT_F32": interpreting() and hidden.dtype == torch.bfloat16}


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dtype not in SUPPORTED or weight.dtype != hidden.dtype:
        raise ValueError(
            f"the Triton head kernel takes float32, bfloat16 or float16 hidden states and head of one dtype, "
            f"not {hidden.dtype} and {weight.dtype}; use impl='chunked'"
        )
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {list(hidden.shape)} and {list(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected, got {list(targets.shape)} for {hidden.shape[0]} rows")


def _splits(n_row_blocks: int, v_blocks: int, device: torch.device, splits: int | None) -> int:
    """Vocabulary splits of the forward: enough programs for two per multiprocessor, each split >= 1 block."""
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = triton.cdiv(2 * sms, n_row_blocks)
    per_split = triton.cdiv(v_blocks, max(1, min(splits, v_blocks)))
    return triton.cdiv(v_blocks, per_split)  # no empty split


def forward(hidden, weight, targets, softcap, *, block_n, block_v, block_h, splits=None, num_warps=4, num_stages=2):
    """Launch the forward kernel and fold its splits: (logp [N] float32, lse [N] float32).

    ``lse = logsumexp_k (m_k + log s_k)`` over the vocabulary splits ``k``; ``logp = sum_k picked_k - lse``."""
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    row_blocks, v_blocks = triton.cdiv(n, block_n), triton.cdiv(v, block_v)
    n_splits = _splits(row_blocks, v_blocks, hidden.device, splits)
    m, s, picked = torch.empty(3, n_splits, n, dtype=torch.float32, device=hidden.device).unbind(0)
    _forward_kernel[(row_blocks, n_splits)](
        hidden, weight, targets, m, s, picked, n, v, h, triton.cdiv(v_blocks, n_splits) * block_v,
        *hidden.stride(), *weight.stride(), float(softcap or 1.0),
        HAS_SOFTCAP=bool(softcap), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, **_flags(hidden),
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    lse = torch.logsumexp(m + s.log(), dim=0)
    return picked.sum(0) - lse, lse


def backward(
    hidden, weight, targets, lse, grad_out, softcap, need_h, need_w, *, block_n, block_v, block_h, splits=None,
    num_warps=4, num_stages=2,
):  # fmt: skip
    """Launch the backward kernel: (grad hidden or None, grad weight or None) in the inputs' dtypes."""
    n, h = hidden.shape
    v = weight.shape[0]
    grad_h = torch.zeros(n, h, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(v, h, dtype=torch.float32, device=hidden.device) if need_w else None
    if n and (need_h or need_w):
        dummy = lse  # an unused pointer argument when one of the gradients is not needed
        _backward_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
            hidden, weight, targets, lse, grad_out.float().contiguous(),
            grad_h if grad_h is not None else dummy, grad_w if grad_w is not None else dummy,
            n, v, h, *hidden.stride(), *weight.stride(), float(softcap or 1.0),
            NEED_H=need_h, NEED_W=need_w, HAS_SOFTCAP=bool(softcap),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, **_flags(hidden),
            num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
        )  # fmt: skip
    return (
        grad_h.to(hidden.dtype) if grad_h is not None else None,
        grad_w.to(weight.dtype) if grad_w is not None else None,
    )


class TritonLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[i, targets[i]] with both passes in Triton; saves only the [N] lse."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, blocks):
        _check(hidden, weight, targets)
        out, lse = forward(hidden, weight, targets, softcap, **blocks)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap, ctx.blocks = softcap, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h, grad_w = backward(hidden, weight, targets, lse, grad_out, ctx.softcap, need_h, need_w, **ctx.blocks)
        return grad_h, grad_w, None, None, None
