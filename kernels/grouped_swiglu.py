"""A SwiGLU MLP's gate/up LoRA projections and ``silu(gate) * up`` in one autograd node, h written in bf16.

bf16-mixed runs gate/up as one grouped product (``kernels.grouped_lora_linear``: ``x [W_g; A_g; W_u; A_u]^T`` in
bf16, [tokens, 2 (i + r)]), then, per member, casts its strided base columns to float32 and adds the low-rank part
in float32 (an addmm), and ``kernels.swiglu`` reads both to write h in bf16 for down_proj (whose stacked layer rounds
h to bf16 anyway). Its backward writes float32 dgate and dup, which the grouped backward then rounds into its bf16
gradient buffer. Per layer that is two strided casts and two [tokens, i] addmm_ in forward and two float32
[tokens, i] tensors written and copied in backward around the elementwise work.

Here the same product runs, then ONE C pass a row reads the bf16 base columns of gate and up and their ``x A^T``
columns, adds ``s (x A^T) B^T`` in float32 (B transposed to [r, i] so that 16 columns take one vector FMA per k,
in registers), and writes gate and up (float32, what backward needs, as SwiGLU keeps them today: the same bytes)
and h (bf16, rounded once). The backward's C pass reads dh (bf16), gate and up and writes dgate and dup rounded to
bf16 straight into the gradient buffer's columns; then the grouped backward's products
(``grouped_lora_linear.grouped_backward_products``): the input gradient, the A and the B gradients.

Numbers: the base columns and ``x A^T`` are the grouped product's; gate and up differ from the addmm's by float32
rounding (the r products summed in another order); h, dgate and dup are ``kernels.cpu_swiglu``'s formulas
(``swiglu_fwd_bf16``, ``swiglu_bwd_bf16``) on those gate and up, so h is bit for bit
``cpu_swiglu.swiglu_forward_native_bf16(gate, up)`` (what the recompute of h uses) and the gradient buffer bit for
bit what the grouped backward would round SwiGLU's float32 gradients to. x may be float32 or bf16 (its gradient in
its dtype); the adapters and their gradients are float32.

The torch path (``impl='torch'``, or where the C cannot run: no AVX-512 BF16, another device) computes the same
steps with torch's ops (the casts, addmm_, ``silu``, ``silu_backward``).

Kept for backward: x (``kernels.recompute`` rebuilds the norm's output), the [tokens, r_g + r_u] bf16 ``x A^T``,
the stack, the B weights, and gate and up in float32: the bytes the grouped product and SwiGLU keep today, so the
memory estimate is unchanged. h is not kept (rebuilt from gate and up, as today). Keeping only the bf16 product
instead ([tokens, 2 (i + r)], half the bytes of gate and up) and recomputing gate and up in the backward's pass
would save 4 (i - r) bytes a token and layer (bundled model, 455 tokens: 2.8 MB a layer, 84 MB a step) for about
0.4 ms a layer of recompute; it needs the estimate to know when this node runs, and is not done.

Measured (2-core Zen 4, one thread, [455, 1536], r = 16): the C forward 0.78 ms (the 32 r-long sums a row were
1.6 ms with the sums in an array, which went through the stack each k), the backward pass 0.40 ms; one layer's
forward + backward against the separate ops about 0.5-0.8 ms less. The bundled step's alternating A/B
(``benchmarks/profile_step.py --ab grouped_swiglu``, one thread, 6-8 rounds): SFT on/off 0.975-0.997, DPO
0.979-0.991, the same loss and gradient norm to the digits printed; the live bytes at the end of the forward the
same (775 / 774 MiB in use).

Layering: reference (``grouped_swiglu_reference``: float32 eager) -> autograd Function (``_GroupedSwiGLU``) ->
public op (``grouped_swiglu``, which checks its arguments). ``NATIVE = False`` sends everything through the torch
path; the MLP's wiring (``engine.train.model_patches.fused_ops``) asks :func:`runs_here` and keeps the separate
ops otherwise; ``ENABLED = False`` keeps them everywhere (for A/Bs).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finetune_studio.kernels import cpu_swiglu, native_build
from finetune_studio.kernels.grouped_lora_linear import grouped_backward_products, member_layout
from finetune_studio.kernels.lora_linear import lora_linear_reference

log = logging.getLogger(__name__)

ENABLED = True  # the fused ops' MLP runs gate/up and SwiGLU through this node where it can (runs_here)
NATIVE = True  # impl='auto' runs the C passes where they can run

SOURCE = (
    r"""
#include <immintrin.h>
#include <stdint.h>
#define AVX512 __attribute__((target("avx512f")))
"""
    + native_build.EXP_PS
    + native_build.BF16_PS
    + r"""
int grouped_swiglu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static inline float bf16_float(uint16_t v) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)v << 16;
  return c.f;
}

/* cpu_swiglu's silu(g) * u */
AVX512BW static inline __m512 silu_mul(__m512 gv, __m512 uv) {
  __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
  return _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), uv);
}

#define RB 4 /* rows a block: each 32 columns of B^T loaded once for RB rows */

/* acc[j][0..1] = sum_k xa[j][k] bt[k, 0..31] for the RB rows j: bt rows `cols` floats apart, lanes lo / hi (the
   sums in named locals, written to acc once: an array indexed in the loop went through the stack each k) */
AVX512BW static inline void low_rank(const float* xa, int64_t r, const float* bt, int64_t cols, __mmask16 lo,
                                     __mmask16 hi, __m512 acc[RB][2]) {
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float *x0 = xa, *x1 = xa + r, *x2 = xa + 2 * r, *x3 = xa + 3 * r;
  for (int64_t k = 0; k < r; k++) {
    __m512 b0 = _mm512_maskz_loadu_ps(lo, bt + k * cols), b1 = _mm512_maskz_loadu_ps(hi, bt + k * cols + 16);
    __m512 v = _mm512_set1_ps(x0[k]);
    a00 = _mm512_fmadd_ps(v, b0, a00), a01 = _mm512_fmadd_ps(v, b1, a01);
    v = _mm512_set1_ps(x1[k]);
    a10 = _mm512_fmadd_ps(v, b0, a10), a11 = _mm512_fmadd_ps(v, b1, a11);
    v = _mm512_set1_ps(x2[k]);
    a20 = _mm512_fmadd_ps(v, b0, a20), a21 = _mm512_fmadd_ps(v, b1, a21);
    v = _mm512_set1_ps(x3[k]);
    a30 = _mm512_fmadd_ps(v, b0, a30), a31 = _mm512_fmadd_ps(v, b1, a31);
  }
  acc[0][0] = a00, acc[0][1] = a01, acc[1][0] = a10, acc[1][1] = a11;
  acc[2][0] = a20, acc[2][1] = a21, acc[3][0] = a30, acc[3][1] = a31;
}

/* per row of full ([rows, sf] bf16): gate = full[cg : cg + cols] + sg * full[xg : xg + rg] btg, up likewise (btg
   [rg, cols], btu [ru, cols] float32); writes gate and up (float32, [rows, cols]) and h = silu(gate) * up
   (bf16, [rows, cols]). RB rows at a time (the last block's missing rows computed on the last row, not stored) */
AVX512BW void grouped_swiglu_fwd(const uint16_t* full, int64_t sf, int64_t cg, int64_t xg, int64_t rg, int64_t cu,
                                 int64_t xu, int64_t ru, const float* btg, const float* btu, float sg, float su,
                                 float* gate, float* up, uint16_t* h, int64_t rows, int64_t cols, int threads) {
  int64_t blocks = (rows + RB - 1) / RB;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t blk = 0; blk < blocks; blk++) {
    int64_t row[RB];
    float xa_g[RB * (rg > 0 ? rg : 1)], xa_u[RB * (ru > 0 ? ru : 1)];
    for (int j = 0; j < RB; j++) {
      row[j] = blk * RB + j < rows ? blk * RB + j : rows - 1;
      const uint16_t* fr = full + row[j] * sf;
      for (int64_t k = 0; k < rg; k++) xa_g[j * rg + k] = bf16_float(fr[xg + k]);
      for (int64_t k = 0; k < ru; k++) xa_u[j * ru + k] = bf16_float(fr[xu + k]);
    }
    for (int64_t i = 0; i < cols; i += 32) {
      int64_t left = cols - i;
      __mmask32 m = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
      __mmask16 lo = (__mmask16)m, hi = (__mmask16)(m >> 16);
      __m512 ag[RB][2], au[RB][2];
      low_rank(xa_g, rg, btg + i, cols, lo, hi, ag);
      low_rank(xa_u, ru, btu + i, cols, lo, hi, au);
      for (int j = 0; j < RB; j++) {
        if (blk * RB + j >= rows) break;
        const uint16_t* fr = full + row[j] * sf + i;
        int64_t o = row[j] * cols + i;
        __m512 vg = _mm512_set1_ps(sg), vu = _mm512_set1_ps(su);
        __m512 g0 = _mm512_fmadd_ps(vg, ag[j][0], from_bf16(_mm256_maskz_loadu_epi16(lo, fr + cg)));
        __m512 g1 = _mm512_fmadd_ps(vg, ag[j][1], from_bf16(_mm256_maskz_loadu_epi16(hi, fr + cg + 16)));
        __m512 u0 = _mm512_fmadd_ps(vu, au[j][0], from_bf16(_mm256_maskz_loadu_epi16(lo, fr + cu)));
        __m512 u1 = _mm512_fmadd_ps(vu, au[j][1], from_bf16(_mm256_maskz_loadu_epi16(hi, fr + cu + 16)));
        _mm512_mask_storeu_ps(gate + o, lo, g0);
        _mm512_mask_storeu_ps(gate + o + 16, hi, g1);
        _mm512_mask_storeu_ps(up + o, lo, u0);
        _mm512_mask_storeu_ps(up + o + 16, hi, u1);
        __m512i hv = to_bf16_pair(silu_mul(g0, u0), silu_mul(g1, u1));
        if (left >= 32)
          _mm512_storeu_si512(h + o, hv);
        else
          _mm512_mask_storeu_epi16(h + o, m, hv);
      }
    }
  }
}

/* cpu_swiglu's swiglu_bwd_bf16 over 16 lanes: (dg, du) */
AVX512BW static inline void swiglu_grads(__m512 d, __m512 gv, __m512 uv, __m512* dg, __m512* du) {
  __m512 one = _mm512_set1_ps(1.f);
  __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
  *du = _mm512_mul_ps(d, _mm512_mul_ps(gv, s));
  __m512 t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);
  *dg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, uv), s), t);
}

/* dh (bf16, rows sd apart), gate and up (float32, [rows, cols]) -> dgate and dup rounded to bf16 into gcat's
   columns cg and cu (rows sc apart) */
AVX512BW void grouped_swiglu_bwd(const uint16_t* dh, int64_t sd, const float* gate, const float* up, uint16_t* gcat,
                                 int64_t sc, int64_t cg, int64_t cu, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) {
    const uint16_t* dr = dh + r * sd;
    const float *gr = gate + r * cols, *ur = up + r * cols;
    uint16_t *og = gcat + r * sc + cg, *ou = gcat + r * sc + cu;
    for (int64_t i = 0; i < cols; i += 32) {
      int64_t left = cols - i;
      __mmask32 m = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
      __mmask16 lo = (__mmask16)m, hi = (__mmask16)(m >> 16);
      __m512 dg0, du0, dg1 = _mm512_setzero_ps(), du1 = _mm512_setzero_ps();
      swiglu_grads(from_bf16(_mm256_maskz_loadu_epi16(lo, dr + i)), _mm512_maskz_loadu_ps(lo, gr + i),
                   _mm512_maskz_loadu_ps(lo, ur + i), &dg0, &du0);
      if (hi)
        swiglu_grads(from_bf16(_mm256_maskz_loadu_epi16(hi, dr + i + 16)), _mm512_maskz_loadu_ps(hi, gr + i + 16),
                     _mm512_maskz_loadu_ps(hi, ur + i + 16), &dg1, &du1);
      __m512i gv = to_bf16_pair(dg0, dg1), uv = to_bf16_pair(du0, du1);
      _mm512_mask_storeu_epi16(og + i, m, gv);
      _mm512_mask_storeu_epi16(ou + i, m, uv);
    }
  }
}
"""
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("grouped_swiglu", SOURCE)
    if lib is None:
        return None
    if not lib.grouped_swiglu_supported():
        log.info("grouped_swiglu: this CPU lacks AVX-512 BF16; the MLP keeps its separate ops")
        return None
    p, n, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.grouped_swiglu_fwd.argtypes = [p, n, n, n, n, n, n, n, p, p, f32, f32, p, p, p, n, n, i32]
    lib.grouped_swiglu_fwd.restype = None
    lib.grouped_swiglu_bwd.argtypes = [p, n, p, p, p, n, n, n, n, n, i32]
    lib.grouped_swiglu_bwd.restype = None
    return lib


def available() -> bool:
    """Whether the C passes run here (builds them on the first call: about a second)."""
    return _library() is not None


def _native(x: torch.Tensor, stacked: torch.Tensor) -> bool:
    return (
        NATIVE
        and x.device.type == "cpu"
        and stacked.device.type == "cpu"
        and stacked.dtype == torch.bfloat16
        and x.dtype in (torch.float32, torch.bfloat16)
        and available()
    )


def runs_here(x: torch.Tensor, stacked: torch.Tensor) -> bool:
    """Whether the fused ops' MLP should take this node: ``ENABLED``, ``NATIVE``, the C passes built, CPU tensors, a
    bf16 stack and a float32 or bf16 input."""
    return ENABLED and _native(x, stacked)


def grouped_swiglu_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> torch.Tensor:
    """Eager float32 reference: ``silu(gate) * up`` with gate and up each ``x W^T + s (x A^T) B^T`` (weights: the
    gate's and the up's base weights, in any dtype, taken in float32)."""
    x32 = x.float()
    gate, up = (
        lora_linear_reference(x32, w, None, a.float(), b.float(), s)
        for w, a, b, s in zip(weights, lora_as, lora_bs, scalings, strict=True)
    )
    return F.silu(gate) * up


def _layout_columns(layout: tuple[tuple[int, int], ...]) -> tuple[int, int, int, int]:
    """(gate's first column, its x A^T's, up's, its x A^T's) in the group's product."""
    (out_g, r_g), (out_u, _) = layout
    return 0, out_g, out_g + r_g, out_g + r_g + out_u


def _h_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate) * up).to(torch.bfloat16)


class _GroupedSwiGLU(torch.autograd.Function):
    """``h = silu(gate) * up`` in bf16 with gate and up ``(x_l W^T)_x + s (x_l A^T)_x B^T`` from one product
    ``x_l S^T`` (S the group's stack, A written into it); returns (h, gate, up), gate and up without gradients (the
    float32 tensors kept for backward, for a recompute of h); gradients for x, both A and both B."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        stacked: torch.Tensor,
        layout: tuple[tuple[int, int], ...],
        scalings: tuple[float, ...],
        native: bool,
        *adapters: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lora_as, lora_bs = adapters[:2], adapters[2:]
        n_in, start = stacked.shape[1], 0
        for (out, r), a in zip(layout, lora_as):
            stacked[start + out : start + out + r].copy_(a)  # (a Function's forward runs without gradients)
            start += out + r
        cg, xg, cu, xu = _layout_columns(layout)
        (cols, r_g), (_, r_u) = layout
        rows = x.numel() // n_in
        full = F.linear(x.reshape(-1, n_in).to(stacked.dtype), stacked)  # [N, 2 (i + r)]
        xa = torch.cat((full[:, xg : xg + r_g], full[:, xu : xu + r_u]), 1)  # [N, r_g + r_u] bf16, for backward
        if native:
            gate = torch.empty(rows, cols, dtype=torch.float32, device=x.device)
            up, h = torch.empty_like(gate), torch.empty(rows, cols, dtype=torch.bfloat16, device=x.device)
            bt_g, bt_u = (b.detach().t().float().contiguous() for b in lora_bs)  # [r, i]
            _library_or_raise().grouped_swiglu_fwd(
                full.data_ptr(),
                full.stride(0),
                cg,
                xg,
                r_g,
                cu,
                xu,
                r_u,
                bt_g.data_ptr(),
                bt_u.data_ptr(),
                scalings[0],
                scalings[1],
                gate.data_ptr(),
                up.data_ptr(),
                h.data_ptr(),
                rows,
                cols,
                torch.get_num_threads(),
            )
        else:
            xa32 = xa.float()
            gate = full[:, cg : cg + cols].float().addmm_(xa32[:, :r_g], lora_bs[0].float().t(), alpha=scalings[0])
            up = full[:, cu : cu + cols].float().addmm_(xa32[:, r_g:], lora_bs[1].float().t(), alpha=scalings[1])
            h = _h_torch(gate, up)
        del full
        ctx.save_for_backward(x, xa, stacked, gate, up, *lora_bs)
        ctx.layout, ctx.scalings, ctx.native = layout, scalings, native
        ctx.mark_non_differentiable(gate, up)
        ctx.set_materialize_grads(False)  # no zero gradients made for gate and up
        return h.view(*x.shape[:-1], cols), gate, up

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor | None, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if dh is None:  # (grads are not materialised: h took no part in the loss)
            return (None,) * 9
        x, xa, stacked, gate, up, *lora_bs = ctx.saved_tensors
        layout, n_in = ctx.layout, stacked.shape[1]
        rows, cols = gate.shape
        cg, _xg, cu, _xu = _layout_columns(layout)
        gcat = torch.empty(rows, stacked.shape[0], dtype=stacked.dtype, device=stacked.device)
        d = dh.reshape(rows, cols)
        if ctx.native and d.dtype == torch.bfloat16 and d.stride(1) == 1:
            _library_or_raise().grouped_swiglu_bwd(
                d.data_ptr(),
                d.stride(0),
                gate.data_ptr(),
                up.data_ptr(),
                gcat.data_ptr(),
                gcat.stride(0),
                cg,
                cu,
                rows,
                cols,
                torch.get_num_threads(),
            )
        else:
            d32 = d.float()
            gcat[:, cg : cg + cols].copy_(torch.ops.aten.silu_backward(d32 * up, gate))
            gcat[:, cu : cu + cols].copy_(d32 * F.silu(gate))
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, n_in)
        grad_x, grad_as, grad_bs = grouped_backward_products(
            gcat, x2, xa, stacked, layout, lora_bs, ctx.scalings, need[0], need[5:7], need[7:9]
        )
        return (None if grad_x is None else grad_x.view(x.shape), None, None, None, None, *grad_as, *grad_bs)


def _library_or_raise() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("grouped_swiglu: the C passes are not available here (check available() first)")
    return lib


def grouped_swiglu(
    x: torch.Tensor,
    stacked: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """``silu(gate) * up`` in bf16, gate and up a SwiGLU MLP's LoRA projections of x through one stacked product;
    and a function that rebuilds h (bit for bit, without a graph) from what the node keeps, for
    ``kernels.recompute.recompute_when_saved``.

    x [..., in] float32 or bf16; stacked: the group's frozen [out + r_g + out + r_u, in] bf16 tensor
    (``grouped_lora_linear.stack_group`` of gate's and up's weights: W_g, r_g rows for A_g, W_u, r_u rows for A_u);
    lora_as [r, in], lora_bs [out, r] (float32, one dtype); scalings s_g, s_u. No biases. ``impl``: 'auto' (the C
    passes where they run, else torch's ops) or 'torch'."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"grouped_swiglu: unknown impl {impl!r}")
    if len(lora_as) != 2 or len(lora_bs) != 2 or len(scalings) != 2:
        raise ValueError("grouped_swiglu: one A, B and scaling for gate and one for up")
    if stacked.requires_grad or stacked.dtype != torch.bfloat16 or stacked.dim() != 2 or not stacked.is_contiguous():
        raise ValueError("grouped_swiglu: stacked must be a frozen contiguous 2-D bf16 tensor")
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != stacked.shape[1]:
        raise ValueError(f"grouped_swiglu: x must be float32 or bf16 with {stacked.shape[1]} features")
    widths = [b.shape[0] if b.dim() else 0 for b in lora_bs]
    if widths[0] != widths[1]:
        raise ValueError(f"grouped_swiglu: gate and up widths differ ({widths[0]} vs {widths[1]})")
    layout = member_layout("grouped_swiglu", x, stacked, (None, None), lora_as, lora_bs)
    native = impl == "auto" and _native(x, stacked)
    h, gate, up = _GroupedSwiGLU.apply(
        x, stacked, tuple(layout), tuple(float(s) for s in scalings), native, *lora_as, *lora_bs
    )
    g, u, shape = gate.detach(), up.detach(), h.shape  # (the rebuild must not hold h itself: that would keep it)
    if native:
        return h, lambda: cpu_swiglu.swiglu_forward_native_bf16(g, u).view(shape)

    def rebuild() -> torch.Tensor:
        with torch.no_grad():
            return _h_torch(g, u).view(shape)

    return h, rebuild
