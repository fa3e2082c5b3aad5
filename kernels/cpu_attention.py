"""Causal attention over a packed row of sequences in one C call each way (float32, AVX-512), for ``kernels.attention``.

torch's CPU flash kernel runs one call per sequence of a packed row (``packed_attention``) and, on the bundled
model's ~115-token sequences, spends most of its time outside the dot products. ``attention_forward_native`` takes
the whole row (all sequences, from cumulative lengths; all heads; grouped key/value heads read as they are, no
repeat) in one call; ``attention_backward_native`` gives dq, dk and dv (dk, dv summed over the query heads that share
a key/value head). What flash saves for backward is what this saves (q, k, v, the output and each row's
logsumexp); the backward recomputes the probabilities, no [T, T] tensor is kept:

    S = scale q k^T (keys j <= i of the query's own sequence),  lse_i = log sum_j exp(S_ij),  P = exp(S - lse)
    out = P v;   backward: dP = dout v^T,  delta_i = dout_i . out_i,  dS = P (dP - delta)
    dq = scale dS k,  dk = scale dS^T q,  dv = P^T dout

Float32 in and out, float32 products and sums (sums in another order than torch's, and an exponential of its own as
in ``kernels.cpu_swiglu``: a few float32 ulps from libm's), so results agree with torch's to float32 rounding, not
bit for bit. Inside: per row group of queries, register tiles of queries x keys against a transposed copy of the
keys (S, dP) and of queries x the head dimension (P v, dS k, P^T dout, dS^T q), the head dimension any multiple of
16; the transposed copies by 16 x 16 register blocks. The backward forms a row's P and dS in one pass (the exponential
and dS's elementwise product), and its dk / dv tiles are written, not added, where the group's first head reaches a key
first (no zeroing pass). The forward runs over (batch row, sequence, query head) on torch's thread count, the backward
over (batch row, sequence, key/value head) so that each task owns its dk and dv.

Layouts: q [B, H, T, D], k / v [B, KV, T, D] with any strides whose last is 1 (transformers' transposed views of
[B, T, H, D] are read in place), and so the output's gradient; dq, dk and dv are transposed views of new [B, T,
heads, D] tensors (the layout of the projections they flow back into). The output is a contiguous [B, H, T, D], as
flash's: transformers' attention then copies it to [B, T, H, D] for the output projection, which keeps that copy
for backward besides the output this op keeps, so the step holds what it held with SDPA and the memory estimate
(which counts both) stays true. Written token-major, the output would be the projection's input itself (its
``.contiguous()`` a no-op): one [T, hidden] float32 less per layer, which the estimate does not count yet.

bf16 products (``products=torch.bfloat16``: bf16-mixed's attention, ``kernels.attention.set_products_dtype``; where
the CPU has AVX512_BF16, :func:`bf16_available`, and ``BF16_PRODUCTS`` is set, else the float32 kernel): each
product's operands rounded to bf16 (to nearest even), multiplied in pairs into float32 sums (``vdpbf16ps``), as
flash-attn multiplies on a GPU: S from q and k rounded (pairs along the head dimension), out = P v and dP = dout v^T
from P, v and dout rounded, dq and dk from scale dS rounded (dS = P (dP - delta) formed in float32) with k and q
rounded, dv from P and dout rounded. lse, the softmax, its exponential, delta = dout . out and every result stay
float32; inputs, outputs and what is saved for backward are the float32 kernel's. The roundings happen where the
kernel builds its copies: the keys' (values') transposed copy as pairs along the head dimension, the rows of v, k, q
and dout interleaved by pairs (what a product over tokens multiplies), a tile's q / dout rows, P's row rounded in
the softmax's normalising pass, and the backward's P and dS rounded once, straight from the pass that forms them, as
pairs of rows (dv, dk) and dS also as pairs of keys (dq); nothing of them is written in float32. Results: the float64
attention of the rounded operands to float32 sums; against float32 products ~0.5% of the values' scale. Measured on
a 2-core Zen 4 (one thread; the bundled model's row of 4 sequences of 110-118 tokens, 9 heads, 3 key/value heads, head
dimension 64; FLOPs of the causal pairs, 2 d a product): a layer's forward 0.80 -> 0.58 ms (75 -> 104 GFLOP/s),
backward 1.83 -> 1.18 ms (82 -> 128), both 2.62 -> 1.76 ms (0.67x); inside SFT steps (alternating, 8 rounds) the
step's attention 100 -> 79 ms CPU (0.78x: the step's cold caches cost both alike), DPO's 287 -> 215 ms (0.77x). The
rest of the bf16 variant's time is the softmax's and the roundings' passes, not the products.

**Off by default** (``BF16_PRODUCTS = False``): it costs the learning more than the 1.3% of a step it saves. The
bundled model's loss curves (``benchmarks/mixed_precision_check.py curve``, 20 steps, bf16-mixed seed 1 against
float32 seed 1, whose three seeds spread by 0.0010 on average and 0.0022 at most for SFT, 0.0023 / 0.0121 for DPO):
with bf16 attention products SFT is 0.0022 / 0.0107 away and higher all along (mean loss 0.1308 against float32's
0.1280-0.1288), DPO 0.0049 / 0.0170 (0.3367 against 0.3313-0.3318); with the float32 products SFT is 0.0008 /
0.0023 away (mean 0.1289), within the spread. bf16 rounding of P and dS in the backward, repeated over the layers
and steps, moves the adapters' updates; a GPU run with flash-attn pays the same, which this CPU path need not.

Both variants take the tasks longest sequence first (a sequence costs about its length squared; C global
``attention_longest_first``), so that two threads finish together; each task owns its outputs, so any order and
thread count gives the same bits. Measured on two threads: a row of 40, 60, 300 and 55 tokens' backward 1.96 -> 1.89
ms (float32) and 1.22 -> 1.15 ms (bf16) against the tasks in order; the bundled model's nearly equal sequences gain
nothing. Two threads, the bundled shape: forward and backward 1.36-1.58 ms float32, 0.93-1.07 ms bf16 (0.68x); inside
SFT steps the attention's wall time 56 -> 45 ms (0.80x).

C compiled once and loaded with ctypes (``kernels.native_build``); :func:`available` is False where the CPU lacks
AVX-512 or nothing compiles, and ``kernels.attention`` keeps torch's SDPA.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from finetune_studio.kernels import native_build

log = logging.getLogger(__name__)

BF16_PRODUCTS = False  # True: a call asking for bf16 products (bf16-mixed's attention) takes the vdpbf16ps variant

SOURCE = (
    r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#define AVX512 __attribute__((target("avx512f")))
#define INLINE static inline __attribute__((always_inline))
#define MR 6   /* query rows of a register tile */
#define BQ 64  /* query rows of a backward block */

int cpu_attention_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

static inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

"""
    + native_build.EXP_PS
    + native_build.BF16_PS
    + r"""

/* s[m][n0 .. n0 + 16 nz) = sum_d a[m * as + d] * bt[d * bts + n0 ..], m < mr (the caller's constants) */
AVX512 INLINE void nt_tile(int mr, int nz, int64_t d, const float* a, int64_t as, const float* bt, int64_t bts,
                           float* s, int64_t ss) {
  __m512 acc[MR][2];
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) acc[m][z] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; e++) {
    __m512 b0 = _mm512_loadu_ps(bt + e * bts), b1 = nz > 1 ? _mm512_loadu_ps(bt + e * bts + 16) : b0;
    for (int m = 0; m < mr; m++) {
      __m512 av = _mm512_set1_ps(a[m * as + e]);
      acc[m][0] = _mm512_fmadd_ps(av, b0, acc[m][0]);
      if (nz > 1) acc[m][1] = _mm512_fmadd_ps(av, b1, acc[m][1]);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) _mm512_storeu_ps(s + m * ss + 16 * z, acc[m][z]);
}

/* tile(m, ...) with m = mr (1 .. MR), each case a compile-time row count the inlined tile unrolls for */
#define BY_MR(tile, ...)                  \
  switch (mr) {                           \
    case 6: tile(6, __VA_ARGS__); break;  \
    case 5: tile(5, __VA_ARGS__); break;  \
    case 4: tile(4, __VA_ARGS__); break;  \
    case 3: tile(3, __VA_ARGS__); break;  \
    case 2: tile(2, __VA_ARGS__); break;  \
    default: tile(1, __VA_ARGS__); break; \
  }

/* s[m][0 .. 16 ceil(n / 16)) = a_m . bt[:, j] for m < mr rows of a (row stride as), d columns; bt [d][>= n, padded] */
AVX512 INLINE void nt_rows(int mr, int64_t n, int64_t d, const float* a, int64_t as, const float* bt, int64_t bts,
                           float* s, int64_t ss) {
  int64_t j = 0;
  for (; j + 32 <= n || (j + 16 < n); j += 32) BY_MR(nt_tile, 2, d, a, as, bt + j, bts, s + j, ss)
  if (j < n) BY_MR(nt_tile, 1, d, a, as, bt + j, bts, s + j, ss)
}

/* c[m][0 .. 16 nz) (+)= sum_{k < kn} a[m * am + k * ak] * b[k * bs + ..], m < mr (the caller's constants) */
AVX512 INLINE void nn_tile(int mr, int nz, int64_t kn, const float* a, int64_t am, int64_t ak, const float* b,
                           int64_t bs, float* c, int64_t cs, int add) {
  __m512 acc[MR][4];
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) acc[m][z] = add ? _mm512_loadu_ps(c + m * cs + 16 * z) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kn; k++) {
    __m512 bv[4];
    for (int z = 0; z < nz; z++) bv[z] = _mm512_loadu_ps(b + k * bs + 16 * z);
    for (int m = 0; m < mr; m++) {
      __m512 av = _mm512_set1_ps(a[m * am + k * ak]);
      for (int z = 0; z < nz; z++) acc[m][z] = _mm512_fmadd_ps(av, bv[z], acc[m][z]);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) _mm512_storeu_ps(c + m * cs + 16 * z, acc[m][z]);
}

#define NN_MR(nz) BY_MR(nn_tile, nz, kn, a, am, ak, b + o, bs, c + o, cs, add)

/* c[m][0 .. d) (+)= sum_{k < kn} a(m, k) b[k][..] for mr <= MR rows, d a multiple of 16 */
AVX512 static void nn_rows(int mr, int64_t d, int64_t kn, const float* a, int64_t am, int64_t ak, const float* b,
                           int64_t bs, float* c, int64_t cs, int add) {
  int64_t o = 0;
  for (; o + 64 <= d; o += 64) NN_MR(4)
  if (d - o == 48) NN_MR(3)
  else if (d - o == 32) NN_MR(2)
  else if (d - o == 16) NN_MR(1)
}

/* the 16 x 16 block r[0 .. 16) (rows) transposed in place: r[c] becomes column c */
AVX512 INLINE void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  /* r[4 i + c], 128-bit lane l: rows 4 i .. 4 i + 3 of column 4 l + c */
  for (int c = 0; c < 4; c++) {
    __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    t[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
  for (int c = 0; c < 16; c++) r[c] = t[c];
}

/* kt[e][j] = k[j][e] for j < n, e < d (a multiple of 16); zero for n <= j < np (a multiple of 16), by 16 x 16 blocks */
AVX512 static void transpose(const float* k, int64_t ks, int64_t n, int64_t d, float* kt, int64_t np) {
  for (int64_t j0 = 0; j0 < np; j0 += 16) {
    for (int64_t e0 = 0; e0 < d; e0 += 16) {
      __m512 r[16];
      for (int x = 0; x < 16; x++)
        r[x] = j0 + x < n ? _mm512_loadu_ps(k + (j0 + x) * ks + e0) : _mm512_setzero_ps();
      transpose16(r);
      for (int x = 0; x < 16; x++) _mm512_storeu_ps(kt + (e0 + x) * np + j0, r[x]);
    }
  }
}

/* row of scores s[0 .. n) -> probabilities exp(scale (s - max)) / sum for j < live, 0 for live <= j < 16 ceil(n / 16)
   (s has that many columns); returns the row's logsumexp of scale s */
AVX512 static float softmax_row(float* s, int64_t live, int64_t n, float scale) {
  __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < live; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail(live - j), s + j));
  __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale), sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < live; j += 16) {
    __mmask16 t = tail(live - j);
    __m512 p = _mm512_maskz_mov_ps(t, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, mv)));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  float total = _mm512_reduce_add_ps(sum);
  __m512 inv = _mm512_set1_ps(1.f / total);
  int64_t j = 0;
  for (; j < live; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
  for (; j < n; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
  return _mm512_reduce_max_ps(mx) * scale + logf(total);
}

typedef struct {
  int64_t b, h, t; /* strides of [B, heads, T, D] (the last stride 1) */
} strides;

static int64_t off(strides s, int64_t b, int64_t h, int64_t t) { return b * s.b + h * s.h + t * s.t; }

/* the sequences' indices, longest first (ties in their order), where attention_longest_first is set: the tasks of
   the longest sequences start first (a sequence costs about its length squared), so that threads finish together */
int attention_longest_first = 1;

static int64_t* longest_first(const int64_t* cu, int64_t nseq) {
  int64_t* order = (int64_t*)malloc(sizeof(int64_t) * (nseq > 0 ? nseq : 1));
  for (int64_t i = 0; i < nseq; i++) {
    int64_t len = cu[i + 1] - cu[i], j = i;
    for (; attention_longest_first && j > 0 && cu[order[j - 1] + 1] - cu[order[j - 1]] < len; j--)
      order[j] = order[j - 1];
    order[j] = i;
  }
  return order;
}

/* out [B, H, T, D] (strides so_), lse [B, H, T] contiguous; cu [nseq + 1] cumulative lengths */
AVX512 void attention_fwd(const float* q, const float* k, const float* v, float* out, float* lse, const int64_t* cu,
                          int64_t nseq, int64_t nb, int64_t nh, int64_t nkv, int64_t t_len, int64_t d, float scale,
                          strides sq, strides sk, strides sv, strides so, int threads) {
  int64_t tasks = nb * nseq * nh, group = nh / nkv;
  int64_t* order = longest_first(cu, nseq);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t h = task % nh, b = (task / nh) % nb, s = order[task / (nh * nb)];
    int64_t start = cu[s], n = cu[s + 1] - start, np = (n + 15) / 16 * 16;
    if (n <= 0) continue;
    float* kt = (float*)malloc(sizeof(float) * (d * np + MR * np));
    float* p = kt + d * np;
    transpose(k + off(sk, b, h / group, start), sk.t, n, d, kt, np);
    const float* qh = q + off(sq, b, h, start);
    const float* vh = v + off(sv, b, h / group, start);
    float* oh = out + off(so, b, h, start);
    float* lh = lse + (b * nh + h) * t_len + start;
    for (int64_t r = 0; r < n; r += MR) {
      int mr = n - r < MR ? (int)(n - r) : MR;
      int64_t keys = r + mr;
      nt_rows(mr, keys, d, qh + r * sq.t, sq.t, kt, np, p, np);
      for (int m = 0; m < mr; m++) lh[r + m] = softmax_row(p + m * np, r + m + 1, keys, scale);
      nn_rows(mr, d, keys, p, np, 1, vh, sv.t, oh + r * so.t, so.t, 0);
    }
    free(kt);
  }
  free(order);
}

/* dq [B, H, T, D] (strides sdq), dk / dv [B, KV, T, D] (strides sdk, sdv), overwritten */
AVX512 void attention_bwd(const float* dout, const float* q, const float* k, const float* v, const float* out,
                          const float* lse, float* dq, float* dk, float* dv, const int64_t* cu, int64_t nseq,
                          int64_t nb, int64_t nh, int64_t nkv, int64_t t_len, int64_t d, float scale, strides sdo,
                          strides sq, strides sk, strides sv, strides so, strides sdq, strides sdk, strides sdv,
                          int threads) {
  int64_t tasks = nb * nseq * nkv, group = nh / nkv;
  int64_t* order = longest_first(cu, nseq);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t g = task % nkv, b = (task / nkv) % nb, s = order[task / (nkv * nb)];
    int64_t start = cu[s], n = cu[s + 1] - start, np = (n + 15) / 16 * 16;
    if (n <= 0) continue;
    float* kt = (float*)malloc(sizeof(float) * (2 * d * np + 2 * BQ * np + BQ));
    float *vt = kt + d * np, *p = vt + d * np, *ds = p + BQ * np, *delta = ds + BQ * np;
    const float* kg = k + off(sk, b, g, start);
    const float* vg = v + off(sv, b, g, start);
    float* dkg = dk + off(sdk, b, g, start);
    float* dvg = dv + off(sdv, b, g, start);
    transpose(kg, sk.t, n, d, kt, np);
    transpose(vg, sv.t, n, d, vt, np);
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
      const float* qh = q + off(sq, b, h, start);
      const float* doh = dout + off(sdo, b, h, start);
      const float* oh = out + off(so, b, h, start);
      const float* lh = lse + (b * nh + h) * t_len + start;
      float* dqh = dq + off(sdq, b, h, start);
      for (int64_t i0 = 0; i0 < n; i0 += BQ) {
        int64_t rows = n - i0 < BQ ? n - i0 : BQ, keys = i0 + rows;
        for (int64_t m = 0; m < rows; m++) {
          const float *x = doh + (i0 + m) * sdo.t, *y = oh + (i0 + m) * so.t;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t e = 0; e < d; e += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + e), _mm512_loadu_ps(y + e), acc);
          delta[m] = _mm512_reduce_add_ps(acc);
        }
        for (int64_t r = 0; r < rows; r += MR) {
          int mr = rows - r < MR ? (int)(rows - r) : MR;
          int64_t live_keys = i0 + r + mr;
          float *pr = p + r * np, *dr = ds + r * np;
          nt_rows(mr, live_keys, d, qh + (i0 + r) * sq.t, sq.t, kt, np, pr, np);
          nt_rows(mr, live_keys, d, doh + (i0 + r) * sdo.t, sdo.t, vt, np, dr, np);
          /* P = exp(scale S - lse) and dS = scale P (dP - delta) in place, one pass over each row; zero for keys j > i
             (up to 16 ceil(keys / 16): the dk / dv products read these columns) */
          __m512 sc = _mm512_set1_ps(scale);
          for (int m = 0; m < mr; m++) {
            int64_t i = i0 + r + m, j = 0;
            float* prow = pr + m * np;
            float* drow = dr + m * np;
            __m512 lv = _mm512_set1_ps(lh[i]), dl = _mm512_set1_ps(delta[r + m]);
            for (; j <= i; j += 16) {
              __mmask16 t = tail(i + 1 - j);
              __m512 pv = _mm512_maskz_mov_ps(t, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(prow + j), sc, lv)));
              __m512 dv = _mm512_maskz_mul_ps(t, pv, _mm512_sub_ps(_mm512_loadu_ps(drow + j), dl));
              _mm512_storeu_ps(prow + j, pv);
              _mm512_storeu_ps(drow + j, _mm512_mul_ps(dv, sc));
            }
            for (; j < keys; j += 16) {
              _mm512_storeu_ps(prow + j, _mm512_setzero_ps());
              _mm512_storeu_ps(drow + j, _mm512_setzero_ps());
            }
          }
          nn_rows(mr, d, live_keys, dr, np, 1, kg, sk.t, dqh + (i0 + r) * sdq.t, sdq.t, 0);
        }
        /* dv[j] += sum_{i >= j} P[i][j] dout[i], dk[j] += sum_{i >= j} dS[i][j] q[i], over this block's rows; the
           group's first head writes keys j >= i0 (none of its earlier blocks reached them) instead of adding, so the
           tiles stop at i0 */
        for (int64_t j0 = 0; j0 < keys;) {
          int64_t edge = j0 < i0 ? i0 : keys;
          int mr = edge - j0 < MR ? (int)(edge - j0) : MR;
          int add = h > g * group || j0 < i0;
          int64_t first = j0 > i0 ? j0 - i0 : 0;
          nn_rows(mr, d, rows - first, p + first * np + j0, 1, np, doh + (i0 + first) * sdo.t, sdo.t,
                  dvg + j0 * sdv.t, sdv.t, add);
          nn_rows(mr, d, rows - first, ds + first * np + j0, 1, np, qh + (i0 + first) * sq.t, sq.t,
                  dkg + j0 * sdk.t, sdk.t, add);
          j0 += mr;
        }
      }
    }
    free(kt);
  }
  free(order);
}

/* ---- bf16 products (vdpbf16ps): operands rounded to bf16, to nearest even; float32 sums and results ---- */

int cpu_attention_bf16_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* native_build's to_bf16_pair (the same bits) with zeros on the fast path: vcvtne2ps2bf16 rounds zeros right, and
   P and dS hold many (the causal mask, exponentials that underflow) */
AVX512BW static inline __m512i to_bf16_pair_z(__m512 lo, __m512 hi) {
  __m512 tiny = _mm512_set1_ps(1.17549435e-38f), zero = _mm512_setzero_ps();
  __mmask16 odd = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(lo, zero, _CMP_NEQ_UQ), _mm512_abs_ps(lo), tiny,
                                          _CMP_NGE_UQ) |
                  _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(hi, zero, _CMP_NEQ_UQ), _mm512_abs_ps(hi), tiny,
                                          _CMP_NGE_UQ);
  if (__builtin_expect(odd == 0, 1)) return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_int(lo)), to_bf16_int(hi), 1);
}

/* y[0 .. w / 2) = x[0 .. w) rounded to bf16, pairs (x[2e], x[2e + 1]) in 32-bit lanes (w a multiple of 16) */
AVX512BW static void round_row(const float* x, int64_t w, uint32_t* y) {
  int64_t e = 0;
  for (; e + 32 <= w; e += 32)
    _mm512_storeu_si512(y + e / 2, to_bf16_pair_z(_mm512_loadu_ps(x + e), _mm512_loadu_ps(x + e + 16)));
  if (e < w)
    _mm256_storeu_si256((__m256i*)(y + e / 2),
                        _mm512_castsi512_si256(to_bf16_pair_z(_mm512_loadu_ps(x + e), _mm512_setzero_ps())));
}

/* kp[e][j] = (k[j][2 e], k[j][2 e + 1]) rounded, for e < d / 2, j < n; zero for n <= j < np: the keys' (values')
   bf16 copy for products over the head dimension, by 16 x 16 blocks of pairs */
AVX512BW static void transpose_pairs(const float* k, int64_t ks, int64_t n, int64_t d, uint32_t* kp, int64_t np) {
  int64_t d2 = d / 2;
  for (int64_t j0 = 0; j0 < np; j0 += 16) {
    for (int64_t e0 = 0; e0 < d2; e0 += 16) {
      int full = d2 - e0 >= 16;
      __m512 r[16];
      for (int x = 0; x < 16; x++) {
        if (j0 + x >= n) {
          r[x] = _mm512_setzero_ps();
          continue;
        }
        const float* row = k + (j0 + x) * ks + 2 * e0;
        __m512 lo = _mm512_loadu_ps(row), hi = full ? _mm512_loadu_ps(row + 16) : _mm512_setzero_ps();
        r[x] = _mm512_castsi512_ps(to_bf16_pair_z(lo, hi));
      }
      transpose16(r);
      for (int c = 0; c < (full ? 16 : 8); c++) _mm512_storeu_ps((float*)(kp + (e0 + c) * np + j0), r[c]);
    }
  }
}

static const uint16_t interleave_index[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                              8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* y[i][e] = (x[2 i][e], x[2 i + 1][e]) rounded, for i < pairs, e < w (a multiple of 16); rows >= n read as zero:
   the bf16 copy of a matrix for products over its rows */
AVX512BW static void interleave_rows(const float* x, int64_t xs, int64_t n, int64_t pairs, int64_t w, uint32_t* y,
                                     int64_t ys) {
  __m512i idx = _mm512_loadu_si512(interleave_index);
  for (int64_t i = 0; i < pairs; i++) {
    const float *a = x + 2 * i * xs, *b = a + xs;
    int ha = 2 * i < n, hb = 2 * i + 1 < n;
    for (int64_t e = 0; e < w; e += 16) {
      __m512 lo = ha ? _mm512_loadu_ps(a + e) : _mm512_setzero_ps();
      __m512 hi = hb ? _mm512_loadu_ps(b + e) : _mm512_setzero_ps();
      _mm512_storeu_si512(y + i * ys + e, _mm512_permutexvar_epi16(idx, to_bf16_pair_z(lo, hi)));
    }
  }
}

/* s[m][n0 .. n0 + 16 nz) = sum_{e < d2} a[m * as + e] . bt[e * bts + n0 ..] (bf16 pairs), m < mr */
AVX512BW INLINE void nt_tile_bf(int mr, int nz, int64_t d2, const uint32_t* a, int64_t as, const uint32_t* bt,
                                int64_t bts, float* s, int64_t ss) {
  __m512 acc[MR][2];
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) acc[m][z] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d2; e++) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(bt + e * bts);
    __m512bh b1 = nz > 1 ? (__m512bh)_mm512_loadu_si512(bt + e * bts + 16) : b0;
    for (int m = 0; m < mr; m++) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[m * as + e]);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], av, b0);
      if (nz > 1) acc[m][1] = _mm512_dpbf16_ps(acc[m][1], av, b1);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) _mm512_storeu_ps(s + m * ss + 16 * z, acc[m][z]);
}

#define NT_BF_MR(nz) BY_MR(nt_tile_bf, nz, d2, a, as, bt + j, bts, s + j, ss)

/* nt_rows over bf16 pairs: a [mr][d2] pairs (row stride as), bt [d2][>= n, padded] pairs */
AVX512BW static void nt_rows_bf(int mr, int64_t n, int64_t d2, const uint32_t* a, int64_t as, const uint32_t* bt,
                                int64_t bts, float* s, int64_t ss) {
  int64_t j = 0;
  for (; j + 32 <= n || (j + 16 < n); j += 32) NT_BF_MR(2)
  if (j < n) NT_BF_MR(1)
}

/* c[m][0 .. 16 nz) (+)= sum_{k < kn2} a[m * am + k * ak] . b[k * bs + ..] (bf16 pairs), m < mr */
AVX512BW INLINE void nn_tile_bf(int mr, int nz, int64_t kn2, const uint32_t* a, int64_t am, int64_t ak,
                                const uint32_t* b, int64_t bs, float* c, int64_t cs, int add) {
  __m512 acc[MR][4];
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) acc[m][z] = add ? _mm512_loadu_ps(c + m * cs + 16 * z) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kn2; k++) {
    __m512bh bv[4];
    for (int z = 0; z < nz; z++) bv[z] = (__m512bh)_mm512_loadu_si512(b + k * bs + 16 * z);
    for (int m = 0; m < mr; m++) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[m * am + k * ak]);
      for (int z = 0; z < nz; z++) acc[m][z] = _mm512_dpbf16_ps(acc[m][z], av, bv[z]);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int z = 0; z < nz; z++) _mm512_storeu_ps(c + m * cs + 16 * z, acc[m][z]);
}

#define NN_BF_MR(nz) BY_MR(nn_tile_bf, nz, kn2, a, am, ak, b + o, bs, c + o, cs, add)

/* c[m][0 .. d) (+)= sum_{k < kn2} a(m, k) . b[k][..] over bf16 pairs (b's rows pairs of rows), d a multiple of 16 */
AVX512BW static void nn_rows_bf(int mr, int64_t d, int64_t kn2, const uint32_t* a, int64_t am, int64_t ak,
                                const uint32_t* b, int64_t bs, float* c, int64_t cs, int add) {
  int64_t o = 0;
  for (; o + 64 <= d; o += 64) NN_BF_MR(4)
  if (d - o == 48) NN_BF_MR(3)
  else if (d - o == 32) NN_BF_MR(2)
  else if (d - o == 16) NN_BF_MR(1)
}

static int64_t up16(int64_t n) { return (n + 15) / 16 * 16; }

static inline __mmask16 tail0(int64_t left) { return left <= 0 ? 0 : tail(left); }

/* softmax_row, its probabilities written rounded to bf16 as pairs of keys (y[0 .. 8 ceil(n / 16)), zero for keys
   >= live) instead of in place: the normalisation and the rounding one pass */
AVX512BW static float softmax_row_bf(float* s, int64_t live, int64_t n, float scale, uint32_t* y) {
  __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < live; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail(live - j), s + j));
  __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale), sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < live; j += 16) {
    __m512 p = _mm512_maskz_mov_ps(tail(live - j), exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, mv)));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  float total = _mm512_reduce_add_ps(sum);
  __m512 inv = _mm512_set1_ps(1.f / total);
  int64_t j = 0, w = up16(n);
  for (; j + 32 <= w; j += 32) {
    __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail0(live - j), s + j), inv);
    __m512 b = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail0(live - j - 16), s + j + 16), inv);
    _mm512_storeu_si512(y + j / 2, to_bf16_pair_z(a, b));
  }
  if (j < w) {
    __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail0(live - j), s + j), inv);
    _mm256_storeu_si256((__m256i*)(y + j / 2), _mm512_castsi512_si256(to_bf16_pair_z(a, _mm512_setzero_ps())));
  }
  return _mm512_reduce_max_ps(mx) * scale + logf(total);
}

AVX512BW void attention_fwd_bf16(const float* q, const float* k, const float* v, float* out, float* lse,
                                 const int64_t* cu, int64_t nseq, int64_t nb, int64_t nh, int64_t nkv, int64_t t_len,
                                 int64_t d, float scale, strides sq, strides sk, strides sv, strides so, int threads) {
  int64_t tasks = nb * nseq * nh, group = nh / nkv, d2 = d / 2;
  int64_t* order = longest_first(cu, nseq);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t h = task % nh, b = (task / nh) % nb, s = order[task / (nh * nb)];
    int64_t start = cu[s], n = cu[s + 1] - start, np = up16(n), np2 = np / 2;
    if (n <= 0) continue;
    float* p = (float*)malloc(sizeof(float) * (MR * np) + sizeof(uint32_t) * (2 * d2 * np + MR * d2 + MR * np2));
    uint32_t *kp = (uint32_t*)(p + MR * np), *vp = kp + d2 * np, *qb = vp + d2 * np, *pb = qb + MR * d2;
    transpose_pairs(k + off(sk, b, h / group, start), sk.t, n, d, kp, np);
    interleave_rows(v + off(sv, b, h / group, start), sv.t, n, np2, d, vp, d);
    const float* qh = q + off(sq, b, h, start);
    float* oh = out + off(so, b, h, start);
    float* lh = lse + (b * nh + h) * t_len + start;
    for (int64_t r = 0; r < n; r += MR) {
      int mr = n - r < MR ? (int)(n - r) : MR;
      int64_t keys = r + mr;
      for (int m = 0; m < mr; m++) round_row(qh + (r + m) * sq.t, d, qb + m * d2);
      nt_rows_bf(mr, keys, d2, qb, d2, kp, np, p, np);
      for (int m = 0; m < mr; m++) lh[r + m] = softmax_row_bf(p + m * np, r + m + 1, keys, scale, pb + m * np2);
      nn_rows_bf(mr, d, (keys + 1) / 2, pb, np2, 1, vp, d, oh + r * so.t, so.t, 0);
    }
    free(p);
  }
  free(order);
}

AVX512BW void attention_bwd_bf16(const float* dout, const float* q, const float* k, const float* v, const float* out,
                                 const float* lse, float* dq, float* dk, float* dv, const int64_t* cu, int64_t nseq,
                                 int64_t nb, int64_t nh, int64_t nkv, int64_t t_len, int64_t d, float scale,
                                 strides sdo, strides sq, strides sk, strides sv, strides so, strides sdq,
                                 strides sdk, strides sdv, int threads) {
  int64_t tasks = nb * nseq * nkv, group = nh / nkv, d2 = d / 2;
  int64_t* order = longest_first(cu, nseq);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t g = task % nkv, b = (task / nkv) % nb, s = order[task / (nkv * nb)];
    int64_t start = cu[s], n = cu[s + 1] - start, np = up16(n), np2 = np / 2;
    if (n <= 0) continue;
    /* float: P, dS [BQ][np], delta [BQ]; pairs: kp, vp [d2][np] (S, dP), kint, qint, doint [np2][d] (dq, dk, dv),
       pint, dsint [BQ / 2][np] (dv, dk), qb, dob [MR][d2], dsb [MR][np2] (dq) */
    size_t floats = 2 * BQ * np + BQ, pairs = 2 * d2 * np + 3 * np2 * d + BQ * np + 2 * MR * d2 + MR * np2;
    float* p = (float*)malloc(sizeof(float) * floats + sizeof(uint32_t) * pairs);
    float *ds = p + BQ * np, *delta = ds + BQ * np;
    uint32_t *kp = (uint32_t*)(delta + BQ), *vp = kp + d2 * np, *kint = vp + d2 * np, *qint = kint + np2 * d;
    uint32_t *doint = qint + np2 * d, *pint = doint + np2 * d, *dsint = pint + BQ / 2 * np, *qb = dsint + BQ / 2 * np;
    uint32_t *dob = qb + MR * d2, *dsb = dob + MR * d2;
    const float* kg = k + off(sk, b, g, start);
    const float* vg = v + off(sv, b, g, start);
    float* dkg = dk + off(sdk, b, g, start);
    float* dvg = dv + off(sdv, b, g, start);
    transpose_pairs(kg, sk.t, n, d, kp, np);
    transpose_pairs(vg, sv.t, n, d, vp, np);
    interleave_rows(kg, sk.t, n, np2, d, kint, d);
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
      const float* qh = q + off(sq, b, h, start);
      const float* doh = dout + off(sdo, b, h, start);
      const float* oh = out + off(so, b, h, start);
      const float* lh = lse + (b * nh + h) * t_len + start;
      float* dqh = dq + off(sdq, b, h, start);
      interleave_rows(qh, sq.t, n, np2, d, qint, d);
      interleave_rows(doh, sdo.t, n, np2, d, doint, d);
      for (int64_t i0 = 0; i0 < n; i0 += BQ) {
        int64_t rows = n - i0 < BQ ? n - i0 : BQ, keys = i0 + rows;
        for (int64_t m = 0; m < rows; m++) {
          const float *x = doh + (i0 + m) * sdo.t, *y = oh + (i0 + m) * so.t;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t e = 0; e < d; e += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + e), _mm512_loadu_ps(y + e), acc);
          delta[m] = _mm512_reduce_add_ps(acc);
        }
        for (int64_t r = 0; r < rows; r += MR) {
          int mr = rows - r < MR ? (int)(rows - r) : MR;
          int64_t live_keys = i0 + r + mr;
          for (int m = 0; m < mr; m++) {
            round_row(qh + (i0 + r + m) * sq.t, d, qb + m * d2);
            round_row(doh + (i0 + r + m) * sdo.t, d, dob + m * d2);
          }
          nt_rows_bf(mr, live_keys, d2, qb, d2, kp, np, p, np);
          nt_rows_bf(mr, live_keys, d2, dob, d2, vp, np, ds, np);
          /* rows i, i + 1 (an odd last row paired with zeros): P = exp(scale S - lse), dS = scale P (dP - delta) in
             float32, zero for keys j > i, rounded to bf16 once: as pairs of rows (pint, dsint: dv's and dk's
             products over the block's rows, up to 16 ceil(keys / 16)) and dS as each row's pairs of keys (dsb: dq's
             product over the keys) */
          __m512 sc = _mm512_set1_ps(scale);
          __m512i idx = _mm512_loadu_si512(interleave_index);
          int64_t width = up16(keys), dq_width = up16(live_keys);
          for (int m = 0; m < mr; m += 2) {
            int two = m + 1 < mr;
            int64_t i = i0 + r + m, live = two ? i + 2 : i + 1;
            const float *s0 = p + m * np, *s1 = s0 + np, *e0 = ds + m * np, *e1 = e0 + np;
            __m512 l0 = _mm512_set1_ps(lh[i]), l1 = _mm512_set1_ps(two ? lh[i + 1] : 0.f);
            __m512 d0 = _mm512_set1_ps(delta[r + m]), d1 = _mm512_set1_ps(two ? delta[r + m + 1] : 0.f);
            uint32_t *pi = pint + (r + m) / 2 * np, *di = dsint + (r + m) / 2 * np, *b0 = dsb + m * np2;
            int64_t j = 0;
            for (; j < live; j += 16) {
              __mmask16 t0 = tail(i + 1 - j), t1 = two ? tail(i + 2 - j) : 0;
              __m512 p0 = _mm512_maskz_mov_ps(t0, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t0, s0 + j), sc, l0)));
              __m512 p1 = _mm512_maskz_mov_ps(t1, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t1, s1 + j), sc, l1)));
              __m512 x0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(t0, e0 + j), d0);
              __m512 x1 = _mm512_sub_ps(_mm512_maskz_loadu_ps(t1, e1 + j), d1);
              __m512 g0 = _mm512_mul_ps(_mm512_maskz_mul_ps(t0, p0, x0), sc);
              __m512 g1 = _mm512_mul_ps(_mm512_maskz_mul_ps(t1, p1, x1), sc);
              __m512i pp = to_bf16_pair_z(p0, p1), gg = to_bf16_pair_z(g0, g1);
              _mm512_storeu_si512(pi + j, _mm512_permutexvar_epi16(idx, pp));
              _mm512_storeu_si512(di + j, _mm512_permutexvar_epi16(idx, gg));
              _mm256_storeu_si256((__m256i*)(b0 + j / 2), _mm512_castsi512_si256(gg));
              if (two) _mm256_storeu_si256((__m256i*)(b0 + np2 + j / 2), _mm512_extracti64x4_epi64(gg, 1));
            }
            for (; j < width; j += 16) {
              _mm512_storeu_si512(pi + j, _mm512_setzero_si512());
              _mm512_storeu_si512(di + j, _mm512_setzero_si512());
              if (j < dq_width) {
                _mm256_storeu_si256((__m256i*)(b0 + j / 2), _mm256_setzero_si256());
                if (two) _mm256_storeu_si256((__m256i*)(b0 + np2 + j / 2), _mm256_setzero_si256());
              }
            }
          }
          nn_rows_bf(mr, d, (live_keys + 1) / 2, dsb, np2, 1, kint, d, dqh + (i0 + r) * sdq.t, sdq.t, 0);
        }
        for (int64_t j0 = 0; j0 < keys;) {
          int64_t edge = j0 < i0 ? i0 : keys;
          int mr = edge - j0 < MR ? (int)(edge - j0) : MR;
          int add = h > g * group || j0 < i0;
          int64_t first = (j0 > i0 ? j0 - i0 : 0) & ~(int64_t)1; /* even: the row before j0 has P = dS = 0 there */
          int64_t kn2 = (rows - first + 1) / 2;
          nn_rows_bf(mr, d, kn2, pint + first / 2 * np + j0, 1, np, doint + (i0 + first) / 2 * d, d,
                     dvg + j0 * sdv.t, sdv.t, add);
          nn_rows_bf(mr, d, kn2, dsint + first / 2 * np + j0, 1, np, qint + (i0 + first) / 2 * d, d,
                     dkg + j0 * sdk.t, sdk.t, add);
          j0 += mr;
        }
      }
    }
    free(p);
  }
  free(order);
}
"""
)


class _Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("t", ctypes.c_int64)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("cpu_attention", SOURCE)
    if lib is None:
        return None
    if not lib.cpu_attention_supported():
        log.info("cpu_attention: this CPU lacks AVX-512; attention stays torch's SDPA")
        return None
    pointer, size, s = ctypes.c_void_p, ctypes.c_int64, _Strides
    shape: list[Any] = [pointer, size, size, size, size, size, size, ctypes.c_float]
    lib.attention_fwd.argtypes = [pointer] * 5 + shape + [s] * 4 + [ctypes.c_int]
    lib.attention_fwd.restype = None
    lib.attention_bwd.argtypes = [pointer] * 9 + shape + [s] * 8 + [ctypes.c_int]
    lib.attention_bwd.restype = None
    lib.attention_fwd_bf16.argtypes = lib.attention_fwd.argtypes
    lib.attention_fwd_bf16.restype = None
    lib.attention_bwd_bf16.argtypes = lib.attention_bwd.argtypes
    lib.attention_bwd_bf16.restype = None
    return lib


@functools.cache
def bf16_available() -> bool:
    """Whether the bf16-product variant runs here: the kernel built and the CPU has AVX512_BF16 (vdpbf16ps)."""
    lib = _library()
    return lib is not None and bool(lib.cpu_attention_bf16_supported())


def _bf16(products: torch.dtype) -> bool:
    """Whether a call asking for ``products`` takes the bf16 variant (asked for, ``BF16_PRODUCTS``, the CPU has it)."""
    return products == torch.bfloat16 and BF16_PRODUCTS and bf16_available()


def available() -> bool:
    """Whether the native attention runs here (builds it on the first call: a few seconds)."""
    return _library() is not None


def runs_on(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q [B, H, T, D], k / v [B, KV, T, D] can go through the kernel: float32 CPU tensors, H a multiple of
    KV, one length T for queries and keys, D a multiple of 16 and v's the same, and the kernel built."""
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 4 for t in (q, k, v))
        and q.shape[0] == k.shape[0] == v.shape[0]
        and k.shape == v.shape
        and k.shape[1] > 0
        and q.shape[1] % k.shape[1] == 0
        and q.shape[2] == k.shape[2]
        and q.shape[3] == k.shape[3]
        and q.shape[3] % 16 == 0
        and q.shape[3] > 0
        and available()
    )


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("cpu_attention: the kernel is not available here (check available() first)")
    return lib


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a last stride of 1 (as it is, else a contiguous copy)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> _Strides:
    return _Strides(t.stride(0), t.stride(1), t.stride(2))


def _new(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B, heads, T, D] tensor: the transposed view of a new contiguous [B, T, heads, D]."""
    b, h, t, d = like.shape
    return torch.empty(b, t, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def _cumulative(lengths: Sequence[int], total: int) -> torch.Tensor:
    if any(n < 0 for n in lengths) or sum(lengths) != total:
        raise ValueError(f"sequence lengths {list(lengths)} do not sum to the row's {total} tokens")
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int64)


def attention_forward_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: Sequence[int],
    scale: float,
    products: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, T, D], lse [B, H, T]): causal attention within each sequence (``lengths``, summing to T) of every
    row; check :func:`runs_on` first. ``products`` bfloat16: the bf16-product variant where it runs (``_bf16``)."""
    lib = _lib()
    fwd = lib.attention_fwd_bf16 if _bf16(products) else lib.attention_fwd
    q, k, v = _rows(q), _rows(k), _rows(v)
    b, h, t, d = q.shape
    cu = _cumulative(lengths, t)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # flash's layout: see the module's docstring
    lse = torch.empty(b, h, t, dtype=q.dtype, device=q.device)
    fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), cu.data_ptr(),
                      len(lengths), b, h, k.shape[1], t, d, scale, _strides(q), _strides(k), _strides(v),
                      _strides(out), torch.get_num_threads())  # fmt: skip
    return out, lse


def attention_backward_native(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: Sequence[int],
    scale: float,
    products: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`attention_forward_native` (with the same ``products``) for the output's gradient
    ``grad``; dk and dv summed over the query heads sharing each key/value head."""
    lib = _lib()
    bwd = lib.attention_bwd_bf16 if _bf16(products) else lib.attention_bwd
    grad, q, k, v, out = _rows(grad), _rows(q), _rows(k), _rows(v), _rows(out)
    b, h, t, d = q.shape
    cu = _cumulative(lengths, t)
    dq, dk, dv = _new(q), _new(k), _new(v)
    lse = lse.contiguous()
    bwd(grad.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                      dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), cu.data_ptr(), len(lengths), b, h, k.shape[1], t,
                      d, scale, *(_strides(x) for x in (grad, q, k, v, out, dq, dk, dv)),
                      torch.get_num_threads())  # fmt: skip
    return dq, dk, dv


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: tuple[int, ...],
        scale: float,
        products: torch.dtype,
    ) -> torch.Tensor:
        products = torch.bfloat16 if _bf16(products) else torch.float32  # the backward multiplies as the forward did
        out, lse = attention_forward_native(q, k, v, lengths, scale, products)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lengths, ctx.scale, ctx.products = lengths, scale, products
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        products = ctx.products if ctx.products == torch.float32 or bf16_available() else torch.float32
        dq, dk, dv = attention_backward_native(grad, q, k, v, out, lse, ctx.lengths, ctx.scale, products)
        wanted = ctx.needs_input_grad
        grads = (dq if wanted[0] else None), (dk if wanted[1] else None), (dv if wanted[2] else None)
        return (*grads, None, None, None)


def causal_attention_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: Sequence[int],
    scale: float | None = None,
    products: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention within each sequence (``lengths``, summing to T) of q [B, H, T, D] over k / v [B, KV, T, D]
    through the C kernel (check :func:`runs_on`), differentiable; ``scale`` defaults to 1 / sqrt(D). ``products``
    bfloat16: the products' operands rounded to bf16 (the module's docstring) where the CPU has AVX512_BF16 and
    ``BF16_PRODUCTS`` is set, else (and for float32) float32 products."""
    if products not in (torch.float32, torch.bfloat16):
        raise ValueError(f"attention products in float32 or bfloat16, not {products}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    result: torch.Tensor = _PackedAttention.apply(q, k, v, tuple(int(n) for n in lengths), scale, products)
    return result
