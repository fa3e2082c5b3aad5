"""q, k and v from one grouped bf16 product, with the LoRA low-rank add and the rotary embedding in one C pass a row.

bf16-mixed runs an attention block's q/k/v as one grouped product (``kernels.grouped_lora_linear``: ``x S^T`` with S
the group's ``[W_q; A_q; W_k; A_k; W_v; A_v]`` in bf16, one [tokens, sum(out_i + r_i)] result), then, per member,
casts its strided bf16 columns to float32, adds the bias and ``s (x A^T) B^T`` (a float32 ``addmm_``), and the
modeling module's ``apply_rotary_pos_emb`` (``kernels.cpu_rotary``) reads q and k again and writes rotated copies;
backward rotates the gradients back (float32 copies) and the grouped backward copies dq, dk and dv to bf16 into its
[tokens, sum(out_i + r_i)] gradient buffer. ``grouped_qkv_rotary`` does the same with the one product and one C pass a
row each way:

- forward, a tile of four rows at a time: q/k/v = the bf16 base (widened) + bias + s * (xa @ B^T) (the r multiply-adds
  in AVX-512 registers over B^T pre-transposed to [r, out], one B^T load serving the four rows), written to float32
  [tokens, out] buffers, then q and k rotated in place with ``cpu_rotary``'s rotation (``cpu_rotary.ROTATE_ROW``:
  each product and sum rounded once, as transformers' ``q * cos + rotate_half(q) * sin``); the [tokens, sum r] bf16
  ``x A_i^T`` columns copied out for backward in the same pass;
- backward: dq and dk rotated back (the same instructions as ``cpu_rotary``'s backward) and dq, dk, dv rounded to
  bf16 (to nearest even, as ``.to(torch.bfloat16)``) straight into the gradient buffer's columns, one pass a row; then
  ``grouped_lora_linear.grouped_backward_products`` (input gradient, the A and B gradients), as the grouped backward.

The numbers: the backward's bf16 gradient buffer is the unfused path's bit for bit (the same inverse rotation, the
same rounding), so for the same upstream gradients every gradient is. The forward can differ from the unfused path
in one place: the low-rank term is summed over r in order with float32 multiply-adds and added to base + bias in
one more (``fma(s, sum_j xa_j B^T_j, base + bias)``), where the unfused ``addmm_`` sums in the BLAS's order, which
is not promised: with torch 2.13's CPU ``addmm_`` (r = 16) the two agree bit for bit on the bundled shape and the
tests' shapes; elsewhere they may differ by a few float32 ulps of q/k/v before rotary (which then rounds as
transformers does). One thread, the bundled model's shape (455 tokens): the forward pass 0.19 ms with its data in
cache, 0.35 ms within a step, against 0.27 ms for the unfused casts and ``addmm_`` plus 0.3 ms of rotary; the
backward pass 0.09 / 0.13 ms against rotary's backward and three casts. Kept for backward: what the grouped
product and the rotary keep today (x, which ``kernels.recompute`` may replace; the [tokens, sum r] bf16
``x A_i^T``; the stack; each B; cos and sin); the outputs are fresh float32 [tokens, out] buffers seen as
[B, H, T, D] (the layout ``cpu_rotary`` gives today).

x is float32 or bf16 (rounded to bf16 for the product either way; its gradient in its dtype); the adapters float32
(their gradients float32). The C passes run where :func:`runs_on` (``NATIVE`` on, ``cpu_rotary.NATIVE`` on, AVX-512
with BW/VL/BF16, a bf16 stack, float32 cos/sin ``[B or 1, T, D]`` without gradients, outside a trace or compile);
elsewhere ``grouped_qkv_rotary`` is today's ops (``grouped_lora_linear``, then ``cpu_rotary.apply_rotary``).

Layering: reference (``grouped_qkv_rotary_reference``, float32) -> autograd Function (``_GroupedQkvRotary``) -> public
op (``grouped_qkv_rotary``, which checks its arguments and picks the C passes or the torch ops).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from finetune_studio.kernels import cpu_rotary, native_build
from finetune_studio.kernels.grouped_lora_linear import grouped_backward_products, grouped_lora_linear, member_layout
from finetune_studio.kernels.lora_linear import lora_linear_reference

log = logging.getLogger(__name__)

NATIVE = True  # the attention's q/k/v group and rotary through the C passes where they run (False: the ops one by one)

SOURCE = (
    r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#define AVX512 __attribute__((target("avx512f")))
#define RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
"""
    + native_build.BF16_PS
    + cpu_rotary.ROTATE_ROW
    + r"""

int qkv_rotary_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#define TILE 4

/* full: the grouped product, bf16 [rows, fs]; ptrs: per member (3) B^T float32 [r, out], its bias (float32 [out] or
   NULL), its output float32 [rows, out]; scal: the members' scalings; meta: rows, steps (T; row n is (n / T, n % T)),
   fs, head_dim, xa's width, cos's (b, t) strides, sin's, then per member its first column in full, out, r, rotate
   (4 each); xa: bf16 [rows, sum r], the members' x A^T columns side by side. Rows by tiles of TILE (a tile's last
   rows past the end repeat its last row: the same values written twice by one thread) */
AVX512BW void qkv_rotary_fwd(const uint16_t* full, const float* const* ptrs, const float* scal, const int64_t* m,
                             const float* cos, const float* sin, uint16_t* xa, int threads) {
  int64_t rows = m[0], steps = m[1], fs = m[2], hd = m[3], xc = m[4], tiles = (rows + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t tile = 0; tile < tiles; tile++) {
    int64_t n[TILE];
    for (int q = 0; q < TILE; q++) n[q] = tile * TILE + q < rows ? tile * TILE + q : rows - 1;
    int64_t rc = 0;
    for (int mb = 0; mb < 3; mb++) {
      const int64_t* mm = m + 9 + 4 * mb;
      int64_t col = mm[0], out = mm[1], r = mm[2];
      const float *bt = ptrs[3 * mb], *bias = ptrs[3 * mb + 1];
      float a[TILE][r > 0 ? r : 1];
      for (int q = 0; q < TILE; q++) {
        const uint16_t* src = full + n[q] * fs + col + out;
        memcpy(xa + n[q] * xc + rc, src, r * sizeof(uint16_t));
        for (int64_t j = 0; j < r; j++) {
          uint32_t bits = (uint32_t)src[j] << 16;
          memcpy(&a[q][j], &bits, 4);
        }
      }
      rc += r;
      __m512 sv = _mm512_set1_ps(scal[mb]);
      for (int64_t i = 0; i < out; i += 16) {
        int64_t left = out - i;
        __mmask16 k = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 acc[TILE];
        for (int q = 0; q < TILE; q++) acc[q] = _mm512_setzero_ps();
        for (int64_t j = 0; j < r; j++) {
          __m512 b = _mm512_maskz_loadu_ps(k, bt + j * out + i);
          for (int q = 0; q < TILE; q++) acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(a[q][j]), b, acc[q]);
        }
        __m512 bv = bias ? _mm512_maskz_loadu_ps(k, bias + i) : _mm512_setzero_ps();
        for (int q = 0; q < TILE; q++) {
          __m512 v = from_bf16(_mm256_maskz_loadu_epi16(k, full + n[q] * fs + col + i));
          if (bias) v = _mm512_add_ps(v, bv);
          _mm512_mask_storeu_ps((float*)ptrs[3 * mb + 2] + n[q] * out + i, k, _mm512_fmadd_ps(sv, acc[q], v));
        }
      }
      if (!mm[3]) continue;
      for (int q = 0; q < TILE; q++) {
        if (q > 0 && n[q] == n[q - 1]) break;  /* a repeated last row: rotated once */
        int64_t b = n[q] / steps, t = n[q] % steps;
        const float *c = cos + b * m[5] + t * m[6], *s = sin + b * m[7] + t * m[8];
        float* y = (float*)ptrs[3 * mb + 2] + n[q] * out;
        for (int64_t h = 0; h < out / hd; h++) rotate_row(y + h * hd, c, s, y + h * hd, hd / 2, 0);
      }
    }
  }
}

/* g: the members' output gradients (float32, unit last stride); meta: rows, steps, head_dim, gcat's row stride, cos's
   (b, t) strides, sin's, then per member its heads, (b, t, h) strides, first column in gcat, rotate (6 each); gcat:
   bf16 [rows, gs], the members' columns written: each gradient (q's and k's rotated back) rounded to bf16 */
AVX512BW void qkv_rotary_bwd(const float* const* g, const int64_t* m, const float* cos, const float* sin,
                             uint16_t* gcat, int threads) {
  int64_t rows = m[0], steps = m[1], hd = m[2], gs = m[3];
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t n = 0; n < rows; n++) {
    int64_t b = n / steps, t = n % steps;
    const float *c = cos + b * m[4] + t * m[5], *s = sin + b * m[6] + t * m[7];
    for (int mb = 0; mb < 3; mb++) {
      const int64_t* mm = m + 8 + 6 * mb;
      int64_t heads = mm[0], out = heads * hd;
      float tmp[out];
      for (int64_t h = 0; h < heads; h++) {
        const float* src = g[mb] + b * mm[1] + t * mm[2] + h * mm[3];
        if (mm[5])
          rotate_row(src, c, s, tmp + h * hd, hd / 2, 1);
        else
          memcpy(tmp + h * hd, src, hd * sizeof(float));
      }
      uint16_t* dst = gcat + n * gs + mm[4];
      for (int64_t i = 0; i < out; i += 32) {
        int64_t left = out - i;
        __mmask32 k = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        __m512 lo = _mm512_maskz_loadu_ps((__mmask16)k, tmp + i);
        __m512 hi = _mm512_maskz_loadu_ps((__mmask16)(k >> 16), tmp + i + 16);
        __m512i v = to_bf16_pair(lo, hi);
        if (left >= 32)
          _mm512_storeu_si512(dst + i, v);
        else
          _mm512_mask_storeu_epi16(dst + i, k, v);
      }
    }
  }
}
"""
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("grouped_qkv_rotary", SOURCE)
    if lib is None:
        return None
    if not lib.qkv_rotary_supported():
        log.info("grouped_qkv_rotary: this CPU lacks AVX-512 BW/VL/BF16; q/k/v and rotary stay the ops one by one")
        return None
    pointer = ctypes.c_void_p
    lib.qkv_rotary_fwd.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, pointer, ctypes.c_int]
    lib.qkv_rotary_fwd.restype = None
    lib.qkv_rotary_bwd.argtypes = [pointer, pointer, pointer, pointer, pointer, ctypes.c_int]
    lib.qkv_rotary_bwd.restype = None
    return lib


def available() -> bool:
    """Whether the C passes run here (builds them on the first call: about a second)."""
    return _library() is not None


def grouped_qkv_rotary_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager float32 reference: each member's ``x @ W_i^T + b_i + s_i * (x @ A_i^T) @ B_i^T`` seen as [B, H, T, D],
    q and k rotated (``q * cos + rotate_half(q) * sin``, cos/sin [B or 1, T, D])."""
    lead = x.shape[:-1]
    q, k, v = (
        lora_linear_reference(x.float(), w, b, a, bb, s).view(*lead, -1, head_dim).transpose(1, 2)
        for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings, strict=True)
    )
    q, k = cpu_rotary.rotary_reference(q, k, cos.float(), sin.float())
    return q, k, v


def _heads_view(y: torch.Tensor, batch: int, steps: int, head_dim: int) -> torch.Tensor:
    """A [B * T, H * D] buffer as [B, H, T, D] (a transposed view: the layout ``cpu_rotary`` gives)."""
    return y.view(batch, steps, -1, head_dim).transpose(1, 2)


class _GroupedQkvRotary(torch.autograd.Function):
    """(q rotated, k rotated, v) as [B, H, T, D] float32 from one product ``x S^T`` and one C pass a row; gradients
    for x, each A and each B (see the module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        stacked: torch.Tensor,
        layout: tuple[tuple[int, int], ...],
        biases: tuple[torch.Tensor | None, ...],
        scalings: tuple[float, ...],
        cos: torch.Tensor,
        sin: torch.Tensor,
        head_dim: int,
        *adapters: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lib = _library()
        if lib is None:
            raise RuntimeError("grouped_qkv_rotary: the C passes are not available here (check runs_on() first)")
        n = len(layout)
        lora_as, lora_bs = adapters[:n], adapters[n:]
        batch, steps, n_in = x.shape
        start = 0
        for (out, r), a in zip(layout, lora_as):
            stacked[start + out : start + out + r].copy_(a)  # (a Function's forward runs without gradients)
            start += out + r
        full = F.linear(x.reshape(-1, n_in).to(stacked.dtype), stacked)  # [N, sum(out_i + r_i)]
        rows = full.shape[0]
        outs = [torch.empty(rows, out, dtype=torch.float32) for out, _ in layout]
        xa = torch.empty(rows, sum(r for _, r in layout), dtype=stacked.dtype)
        bts = [b.t().contiguous() for b in lora_bs]  # [r, out] float32
        bias32 = [None if b is None else b.to(torch.float32).contiguous() for b in biases]
        c, s = cos.expand(batch, steps, head_dim), sin.expand(batch, steps, head_dim)
        meta = [rows, steps, full.stride(0), head_dim, xa.shape[1], c.stride(0), c.stride(1), s.stride(0), s.stride(1)]
        ptrs, col = [], 0
        for (out, r), bt, bias, y, rotate in zip(layout, bts, bias32, outs, (1, 1, 0)):
            ptrs += [bt.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr()]
            meta += [col, out, r, rotate]
            col += out + r
        lib.qkv_rotary_fwd(
            full.data_ptr(),
            (ctypes.c_void_p * 9)(*ptrs),
            (ctypes.c_float * 3)(*scalings),
            (ctypes.c_int64 * 21)(*meta),
            c.data_ptr(),
            s.data_ptr(),
            xa.data_ptr(),
            torch.get_num_threads(),
        )
        del full, bts, bias32
        ctx.save_for_backward(x, xa, stacked, cos, sin, *lora_bs)
        ctx.layout, ctx.scalings, ctx.head_dim = layout, scalings, head_dim
        q, k, v = (_heads_view(y, batch, steps, head_dim) for y in outs)
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lib = _library()
        assert lib is not None
        x, xa, stacked, cos, sin, *lora_bs = ctx.saved_tensors
        layout, scalings, head_dim = ctx.layout, ctx.scalings, ctx.head_dim
        n, low = len(layout), stacked.dtype
        batch, steps = x.shape[0], x.shape[1]
        need_a = ctx.needs_input_grad[8 : 8 + n]
        need_b = ctx.needs_input_grad[8 + n : 8 + 2 * n]
        rows = batch * steps
        gcat = torch.empty(rows, stacked.shape[0], dtype=low)  # [g_1, s_1 g_1 B_1, g_2, ...]
        gs = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]  # [B, H, T, D] each
        c, s = cos.expand(batch, steps, head_dim), sin.expand(batch, steps, head_dim)
        meta = [rows, steps, head_dim, gcat.stride(0), c.stride(0), c.stride(1), s.stride(0), s.stride(1)]
        col = 0
        for (out, r), g, rotate in zip(layout, gs, (1, 1, 0)):
            meta += [out // head_dim, g.stride(0), g.stride(2), g.stride(1), col, rotate]
            col += out + r
        lib.qkv_rotary_bwd(
            (ctypes.c_void_p * 3)(*(g.data_ptr() for g in gs)),
            (ctypes.c_int64 * 26)(*meta),
            c.data_ptr(),
            s.data_ptr(),
            gcat.data_ptr(),
            torch.get_num_threads(),
        )
        del gs
        grad_x, grad_as, grad_bs = grouped_backward_products(
            gcat, x, xa, stacked, layout, lora_bs, scalings, ctx.needs_input_grad[0], need_a, need_b
        )
        return (grad_x, None, None, None, None, None, None, None, *grad_as, *grad_bs)


def runs_on(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, stacked: torch.Tensor | None = None
) -> bool:
    """Whether :func:`grouped_qkv_rotary` takes these through the C passes: ``NATIVE`` and ``cpu_rotary.NATIVE`` on,
    the library built, CPU tensors, x [B, T, in] float32 or bf16, the stack (where given) bf16, cos and sin float32
    ``[B or 1, T, head_dim]`` with a unit last stride and no gradient where autograd records, an even head_dim,
    outside a trace or compile."""
    if not (NATIVE and cpu_rotary.NATIVE) or x.dim() != 3 or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if stacked is not None and (stacked.dtype != torch.bfloat16 or stacked.device.type != "cpu"):
        return False
    if any(t.device.type != "cpu" for t in (x, cos, sin)) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return False
    batch, steps = x.shape[0], x.shape[1]
    shape = (cos.shape[0], steps, head_dim)
    if head_dim <= 0 or head_dim % 2 or cos.shape != shape or sin.shape != shape or cos.shape[0] not in (1, batch):
        return False
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return available()


def grouped_qkv_rotary(
    x: torch.Tensor,
    stacked: torch.Tensor,
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    *,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q rotated, k rotated, v), each [B, H, T, head_dim] float32, of an attention block's grouped q/k/v LoRA linears.

    x [B, T, in] (float32 or bf16); stacked, biases, lora_as, lora_bs, scalings: ``grouped_lora_linear``'s, three
    members (q, k, v; the adapters float32); cos, sin: the rotary embedding's [B or 1, T, head_dim]. ``impl``:
    'auto' (the C passes where :func:`runs_on`, else today's ops: ``grouped_lora_linear`` then
    ``cpu_rotary.apply_rotary``) or 'ops' (those ops)."""
    if impl not in ("auto", "ops"):
        raise ValueError(f"grouped_qkv_rotary: unknown impl {impl!r}")
    if len(lora_as) != 3 or len(lora_bs) != 3 or len(biases) != 3 or len(scalings) != 3:
        raise ValueError("grouped_qkv_rotary: three members (q, k, v), each with a bias (or None), A, B and scaling")
    if x.dim() != 3:
        raise ValueError(f"grouped_qkv_rotary: x must be [batch, tokens, in], not {list(x.shape)}")
    outs = [b.shape[0] for b in lora_bs]
    if head_dim <= 0 or any(out % head_dim for out in outs):
        raise ValueError(f"grouped_qkv_rotary: the members' widths {outs} must be whole heads of {head_dim}")
    if impl == "auto" and runs_on(x, cos, sin, head_dim, stacked):
        return _native(x, stacked, biases, lora_as, lora_bs, scalings, cos, sin, head_dim)
    q, k, v = (
        _heads_view(y.reshape(-1, y.shape[-1]), x.shape[0], x.shape[1], head_dim)
        for y in grouped_lora_linear(x, stacked, biases, lora_as, lora_bs, scalings)
    )
    q, k = cpu_rotary.apply_rotary(q, k, cos, sin)
    return q, k, v


def _native(
    x: torch.Tensor,
    stacked: torch.Tensor,
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if stacked.requires_grad or any(b is not None and b.requires_grad for b in biases):
        raise ValueError("grouped_qkv_rotary: the stacked weights and the biases must be frozen")
    if stacked.dim() != 2 or not stacked.is_contiguous() or stacked.shape[1] != x.shape[-1]:
        raise ValueError(f"grouped_qkv_rotary: stacked must be a contiguous [rows, {x.shape[-1]}] tensor")
    if lora_as[0].dtype != torch.float32:
        raise ValueError("grouped_qkv_rotary: the adapter weights must be float32")
    layout = member_layout("grouped_qkv_rotary", x, stacked, biases, lora_as, lora_bs)
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = _GroupedQkvRotary.apply(
        x.contiguous(),
        stacked,
        tuple(layout),
        tuple(biases),
        tuple(float(s) for s in scalings),
        cos,
        sin,
        head_dim,
        *lora_as,
        *lora_bs,
    )
    return out
