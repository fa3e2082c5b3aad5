"""The output head's two products as bf16 products with a float32 result, on a CPU with AVX-512 BF16.

``bf16_logits(hidden, weight)`` returns ``bf16(hidden) @ bf16(weight).T`` and ``bf16_grad_product(grad, weight)``
returns ``bf16(grad) @ bf16(weight)`` (the head's part of ``d logp / d hidden``), both in float32: the inputs
rounded to bfloat16 (to nearest even), every product and sum in float32 (``vdpbf16ps``), the result never rounded.
torch 2.13 has no such product on the CPU (``out_dtype`` is CUDA-only, oneDNN's bf16 products answer in bf16,
MKL's ``cblas_gemm_bf16bf16f32`` runs at float32's rate on AMD CPUs, oneDNN's ``linear_dynamic_fp16`` at a tenth
of it). On the bundled model's head over 399 positions of the demo data, the log-probs from these logits are off
float64's by 0.0023 on average (at most 0.033), against 0.011 (at most 0.11) when the logits themselves are bf16
(``benchmarks/RESULTS.md``, "The share of the CPU's matrix-product peak").

The head stays float32 (no bf16 copy is kept): each panel of 32 vocabulary rows (``bf16_logits``) or of 32 hidden
columns over 256 vocabulary rows (``bf16_grad_product``) is rounded to bf16 and laid out for ``vdpbf16ps`` (pairs
of inputs, 16 outputs a vector) in a buffer of the thread's own, then multiplied with 12 rows of the other operand
at a time (24 accumulators). Measured on a 2-core Zen 4, one thread, the bundled model's head on one batch's 124
trained positions (576 x 49152): the logits 44 ms against 95-110 ms for torch's float32 product and 38 ms for
oneDNN's bf16 one (whose result is bf16; about 10 of the 44 ms are reading the float32 head and packing it); the
gradient product 46 ms against 50 ms for oneDNN's bf16 products a vocabulary chunk at a time (casts included) and
78 ms in float32.

The kernel is C, compiled once with the system's C compiler and loaded with ctypes (``kernels.native_build``), and
runs on torch's thread count (OpenMP: panels split between threads). :func:`available` is False where the CPU lacks
AVX-512 BF16 or nothing compiles (the log says why); callers then keep torch's products (``kernels.linear_logprobs``
does).

Layering: references (``bf16_logits_reference``, ``bf16_grad_product_reference``: the inputs rounded, the product
in float32 by torch) -> public ops (``bf16_logits``, ``bf16_grad_product``). No autograd: ``kernels.linear_logprobs``
calls them inside its own autograd Function.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from finetune_studio.kernels import native_build

log = logging.getLogger(__name__)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define NB 32 /* vocabulary entries a panel: two vectors of 16 */
#define MR 12 /* rows of h a micro-tile */

int bf16_head_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

/* n float32 -> n bf16 (rounded to nearest even), and a zero after them when n is odd */
BF16 static void to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512((void*)(out + i), (__m512i)v);
  }
  for (; i < n; i += 16) {
    int64_t r = n - i < 16 ? n - i : 16;
    __mmask16 m = (__mmask16)((1u << r) - 1);
    __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i));
    _mm256_mask_storeu_epi16(out + i, m, (__m256i)v);
  }
  if (n & 1) out[n] = 0;
}

/* dst[i * ld_d + j] = src[j * ld_s + i] for a 16 x 16 block of 32-bit words */
BF16 static void transpose16(const uint32_t* src, int64_t ld_s, uint32_t* dst, int64_t ld_d) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void*)(src + i * ld_s));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
  for (int i = 0; i < 16; i++) _mm512_storeu_si512((void*)(dst + i * ld_d), r[i]);
}

/* panel[p][j] = the bf16 pair p (inputs 2p, 2p + 1) of W's row v0 + j, for j < NB (rows past V zero); rows: a
   buffer for the NB rows in bf16 */
BF16 static void pack_panel(const float* W, int64_t V, int64_t K, int64_t ldw, int64_t v0, int64_t P, uint16_t* rows,
                             uint32_t* panel) {
  int64_t K2 = 2 * P;
  for (int j = 0; j < NB; j++) {
    if (v0 + j < V) to_bf16(W + (v0 + j) * ldw, K, rows + j * K2);
    else memset(rows + j * K2, 0, K2 * 2);
  }
  const uint32_t* r32 = (const uint32_t*)rows;
  int64_t p = 0;
  for (; p + 16 <= P; p += 16)
    for (int half = 0; half < 2; half++) transpose16(r32 + half * 16 * P + p, P, panel + p * NB + half * 16, NB);
  for (; p < P; p++)
    for (int j = 0; j < NB; j++) panel[p * NB + j] = r32[j * P + p];
}

/* out[r][0:32] (masks m0, m1 for the two halves) = (add ? out : 0) + sum_p hb[r][p] . panel[p][0:32], r < R */
#define TILE(R)                                                                                                    \
  BF16 static void tile_##R(const uint32_t* hb, int64_t P, const uint32_t* panel, float* out, int64_t ldo,        \
                            __mmask16 m0, __mmask16 m1, int add) {                                                  \
    __m512 acc0[R], acc1[R];                                                                                        \
    for (int r = 0; r < R; r++) {                                                                                   \
      acc0[r] = add ? _mm512_maskz_loadu_ps(m0, out + r * ldo) : _mm512_setzero_ps();                               \
      acc1[r] = add ? _mm512_maskz_loadu_ps(m1, out + r * ldo + 16) : _mm512_setzero_ps();                          \
    }                                                                                                               \
    for (int64_t p = 0; p < P; p++) {                                                                               \
      __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void*)(panel + p * NB));                                   \
      __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void*)(panel + p * NB + 16));                              \
      for (int r = 0; r < R; r++) {                                                                                 \
        __m512bh a = (__m512bh)_mm512_set1_epi32((int)hb[r * P + p]);                                               \
        acc0[r] = _mm512_dpbf16_ps(acc0[r], a, b0);                                                                 \
        acc1[r] = _mm512_dpbf16_ps(acc1[r], a, b1);                                                                 \
      }                                                                                                             \
    }                                                                                                               \
    for (int r = 0; r < R; r++) {                                                                                   \
      _mm512_mask_storeu_ps(out + r * ldo, m0, acc0[r]);                                                            \
      _mm512_mask_storeu_ps(out + r * ldo + 16, m1, acc1[r]);                                                       \
    }                                                                                                               \
  }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)
TILE(7)
TILE(8)
TILE(9)
TILE(10)
TILE(11)
TILE(12)
typedef void (*tile_fn)(const uint32_t*, int64_t, const uint32_t*, float*, int64_t, __mmask16, __mmask16, int);
static const tile_fn TILES[MR + 1] = {0,      tile_1, tile_2, tile_3,  tile_4,  tile_5, tile_6,
                                      tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

/* out[m][v] = sum_k bf16(h[m][k]) bf16(W[v][k]) in float32: h [M][K] (row stride ldh), W [V][K] (ldw), out [M][V]
   (ldo); all float32. Returns 0, or -1 when memory ran out. */
BF16 int bf16_head_logits(const float* h, int64_t M, int64_t ldh, const float* W, int64_t V, int64_t ldw, int64_t K,
                          float* out, int64_t ldo, int threads) {
  int64_t P = (K + 1) / 2;
  uint32_t* hb = (uint32_t*)aligned_alloc(64, ((M * P * 4 + 63) / 64) * 64 + 64);
  if (!hb) return -1;
  for (int64_t m = 0; m < M; m++) to_bf16(h + m * ldh, K, (uint16_t*)(hb + m * P));
  int64_t panels = (V + NB - 1) / NB;
  int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    uint16_t* rows = (uint16_t*)aligned_alloc(64, ((NB * P * 4 + 63) / 64) * 64);
    uint32_t* panel = (uint32_t*)aligned_alloc(64, ((NB * P * 4 + 63) / 64) * 64);
#pragma omp for schedule(static)
    for (int64_t pb = 0; pb < panels; pb++) {
      if (!rows || !panel) { /* every thread still takes its share of the loop (a worksharing construct) */
        failed = 1;
        continue;
      }
      int64_t v0 = pb * NB;
      pack_panel(W, V, K, ldw, v0, P, rows, panel);
      int64_t left = V - v0;
      __mmask16 m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
      __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
      for (int64_t m = 0; m < M; m += MR) {
        int64_t r = M - m < MR ? M - m : MR;
        TILES[r](hb + m * P, P, panel, out + m * ldo + v0, ldo, m0, m1, 0);
      }
    }
    free(rows);
    free(panel);
  }
  free(hb);
  return failed ? -1 : 0;
}

#define VB 256 /* vocabulary rows a block of the gradient product (128 pairs) */

/* panel[q][j] = (bf16 W[v0 + 2q][h0 + j], bf16 W[v0 + 2q + 1][h0 + j]) for q < Q, j < NB (rows past V and columns
   past H zero) */
BF16 static void pack_grad_panel(const float* W, int64_t V, int64_t H, int64_t ldw, int64_t v0, int64_t Q, int64_t h0,
                                 uint32_t* panel) {
  static const short pairs[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4,  20, 5,  21, 6,  22, 7,  23,
                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  __m512i idx = _mm512_loadu_si512((const void*)pairs);
  for (int half = 0; half < 2; half++) {
    int64_t c = h0 + 16 * half, left = H - c;
    __mmask16 m = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    for (int64_t q = 0; q < Q; q++) {
      int64_t v = v0 + 2 * q;
      __m512 a = v < V ? _mm512_maskz_loadu_ps(m, W + v * ldw + c) : _mm512_setzero_ps();
      __m512 b = v + 1 < V ? _mm512_maskz_loadu_ps(m, W + (v + 1) * ldw + c) : _mm512_setzero_ps();
      __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a's 16 bf16, then b's */
      _mm512_storeu_si512((void*)(panel + q * NB + 16 * half), _mm512_permutexvar_epi16(idx, ab));
    }
  }
}

/* out[m][h] = sum_v bf16(G[m][v]) bf16(W[v][h]) in float32: G [M][V] (row stride ldg), W [V][H] (ldw), out [M][H]
   (ldo); all float32. Threads split the hidden columns (panels of NB); each walks the vocabulary in blocks of VB
   rows, rounding its block of G and packing its panels of W as it goes. Returns 0, or -1 when memory ran out. */
BF16 int bf16_head_grad(const float* G, int64_t M, int64_t ldg, const float* W, int64_t V, int64_t ldw, int64_t H,
                        float* out, int64_t ldo, int threads) {
  int64_t QB = VB / 2, panels = (H + NB - 1) / NB;
  int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int nthreads = 1, me = 0;
#ifdef _OPENMP
    nthreads = omp_get_num_threads();
    me = omp_get_thread_num();
#endif
    int64_t first = panels * me / nthreads, last = panels * (me + 1) / nthreads;
    uint32_t* gb = (uint32_t*)aligned_alloc(64, ((M * QB * 4 + 63) / 64) * 64 + 64);
    uint32_t* panel = (uint32_t*)aligned_alloc(64, QB * NB * 4);
    if (!gb || !panel) {
#pragma omp atomic write
      failed = 1;
    } else if (first < last) {
      for (int64_t v0 = 0; v0 < V; v0 += VB) {
        int64_t n = V - v0 < VB ? V - v0 : VB, Q = (n + 1) / 2;
        for (int64_t m = 0; m < M; m++) to_bf16(G + m * ldg + v0, n, (uint16_t*)(gb + m * Q));
        for (int64_t pb = first; pb < last; pb++) {
          int64_t h0 = pb * NB, left = H - h0;
          pack_grad_panel(W, V, H, ldw, v0, Q, h0, panel);
          __mmask16 m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
          __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
          for (int64_t m = 0; m < M; m += MR) {
            int64_t r = M - m < MR ? M - m : MR;
            TILES[r](gb + m * Q, Q, panel, out + m * ldo + h0, ldo, m0, m1, v0 > 0);
          }
        }
      }
    }
    free(gb);
    free(panel);
  }
  return failed ? -1 : 0;
}
"""


def bf16_logits_reference(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [n, H], weight [V, H] -> [n, V] float32: both rounded to bf16, the product in float32."""
    return hidden.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().t()


def bf16_grad_product_reference(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [n, V], weight [V, H] -> [n, H] float32: both rounded to bf16, the product in float32."""
    return grad.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float()


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("bf16_head", SOURCE)
    if lib is None:
        return None
    if not lib.bf16_head_supported():
        log.info("bf16_head: this CPU lacks AVX-512 BF16; the head's products stay torch's")
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.bf16_head_logits.argtypes = [pointer, size, size, pointer, size, size, size, pointer, size, ctypes.c_int]
    lib.bf16_head_logits.restype = ctypes.c_int
    lib.bf16_head_grad.argtypes = [pointer, size, size, pointer, size, size, size, pointer, size, ctypes.c_int]
    lib.bf16_head_grad.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether :func:`bf16_logits` runs here (builds the kernel on the first call: about a second)."""
    return _library() is not None


def _checked(a: torch.Tensor, weight: torch.Tensor, name: str) -> tuple[ctypes.CDLL, torch.Tensor, torch.Tensor]:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"{name}: the kernel is not available here (check available() first)")
    if a.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"{name}: float32 inputs, not {a.dtype} and {weight.dtype}")
    if a.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"{name}: CPU tensors only")
    if a.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{name}: two matrices, not {list(a.shape)} and {list(weight.shape)}")
    return lib, (a if a.stride(1) == 1 else a.contiguous()), (weight if weight.stride(1) == 1 else weight.contiguous())


def bf16_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``bf16(hidden) @ bf16(weight).T`` in float32: hidden [n, H] and weight [V, H] float32 CPU tensors (any row
    stride); returns a new [n, V] float32 tensor. Check :func:`available` first."""
    lib, hidden, weight = _checked(hidden, weight, "bf16_logits")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"bf16_logits: hidden [n, H] and weight [V, H], not {list(hidden.shape)} and {list(weight.shape)}"
        )
    (n, size), vocab = hidden.shape, weight.shape[0]
    out = torch.empty(n, vocab, dtype=torch.float32)
    if n == 0 or vocab == 0 or size == 0:
        return out.zero_()
    args = (hidden.data_ptr(), n, hidden.stride(0), weight.data_ptr(), vocab, weight.stride(0), size)
    if lib.bf16_head_logits(*args, out.data_ptr(), out.stride(0), torch.get_num_threads()) != 0:
        raise MemoryError("bf16_logits: the kernel could not allocate its buffers")
    return out


def bf16_grad_product(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``bf16(grad) @ bf16(weight)`` in float32 (the head's gradient product ``G W``): grad [n, V] and weight [V, H]
    float32 CPU tensors (any row stride); returns a new [n, H] float32 tensor. Check :func:`available` first."""
    lib, grad, weight = _checked(grad, weight, "bf16_grad_product")
    if grad.shape[1] != weight.shape[0]:
        raise ValueError(
            f"bf16_grad_product: grad [n, V] and weight [V, H], not {list(grad.shape)} and {list(weight.shape)}"
        )
    (n, vocab), size = grad.shape, weight.shape[1]
    out = torch.empty(n, size, dtype=torch.float32)
    if n == 0 or vocab == 0 or size == 0:
        return out.zero_()
    args = (grad.data_ptr(), n, grad.stride(0), weight.data_ptr(), vocab, weight.stride(0), size)
    if lib.bf16_head_grad(*args, out.data_ptr(), out.stride(0), torch.get_num_threads()) != 0:
        raise MemoryError("bf16_grad_product: the kernel could not allocate its buffers")
    return out
