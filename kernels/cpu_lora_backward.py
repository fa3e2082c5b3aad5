"""A LoRA member's rank-r backward products in one pass over its bf16 output gradient (AVX-512 BF16).

Under bf16-mixed, a LoRA member's backward (``kernels.lora_linear``'s ``_LoraLinearLow``, the grouped
``grouped_lora_linear.grouped_backward_products``) runs two rank-r products over its bf16 output gradient g
([N, out], often a strided column block of the group's gradient buffer): ``gb = g B`` ([N, out] x [out, r]) and
B's gradient ``s g^T xa`` ([out, N] x [N, r]). Each is memory-bound (a few FLOPs per byte of g) and each reads all
of g, which has left the cache by then: 40-50 GFLOP/s on a 2-core Zen 4, one thread. ``lora_backward_products``
reads g once, 64 rows at a time (the block stays in L1/L2 while both products use it), and computes both with
``vdpbf16ps`` (pairs of bf16 products summed into float32 lanes): for 16 outputs at a time, B's gradient's
[16, r] accumulator stays in registers over the block's rows; gb's [64, r] float32 sums stay in a small buffer
over the outputs. It writes gb scaled by s and rounded to bf16 (into the gradient buffer's low-rank columns, a row
stride given) and/or gb unscaled in bf16 (the A gradient's operand), and B's gradient in float32.

The numbers: float32 accumulation of exact bf16 products, as torch's bf16 products (oneDNN) do; what differs is the
order of the additions (here: pairs of adjacent terms, then in order along the reduced dimension, 16 at a time)
and the roundings of the results: torch rounds gb to bf16 and then ``s gb`` to bf16 again, here ``s gb`` is rounded
once (the same for a power-of-two s, the usual ``alpha / r``); torch rounds ``g^T xa`` to bf16 before the float32
scaling, here B's gradient is never rounded to bf16 (float32 sums times s: closer to the exact value). vdpbf16ps
takes bf16 subnormals as zero and flushes subnormal float32 results (values below 1.2e-38).

Threads: the rows go in an even number of equal parts of about 128 rows (one part up to 128 rows), shared among
torch's threads; B's gradient adds the parts' sums in order, so one thread and two give the same bits. On two
threads the pass had run on one while the other waited: the SFT step's alternating A/B on two threads (the engine's
default spinning wait, load ~1; ``profile_step.py --ab lora_backward_parallel --threads 2``) gives 0.957x CPU a step
(median of 10 rounds; 0.970 the median of the rounds' ratios). Alone, hot, [455, 1536]: 198 against 325 us by the
clock on two threads; [455, 576] 88 against 130; [455, 192] 39 against 53.

Measured on a 2-core Zen 4 (AVX512_BF16, no AMX), the bundled model's step (SmolLM2-135M, rank 16; every member's
call timed inside real steps, C and torch's ops alternating): SFT (455 tokens, one thread) 39-59 ms of CPU a step
against 78-105 ms (0.50-0.56x; [455, 1536] members 0.63-0.74x, [455, 576] 0.41x, [455, 192] 0.41x), DPO (926
tokens) 85 against 164 ms, SFT on two threads (torch's products on both, this one on one) 97 against 172 ms of
process CPU. Alone, hot in the cache, [455, 1536]: 0.27 against 0.37 ms. A profiled SFT step (4 alternating steps
a side): 1639 against 1722 ms of self CPU (aten::mm -82 ms, the backward nodes' self time, where the C pass is
counted, +20 ms). The whole step's alternating A/B (``benchmarks/profile_step.py --ab lora_backward_native``) barely
resolves the 2-3% this is worth on this noisy machine: SFT one thread, medians of the rounds' ratios 1.007, 0.986,
1.008, 0.966 (6, 6, 10, 10 rounds); DPO 1.013, 0.983; SFT two threads 0.978. Losses equal, gradient norms equal
to 2e-6 relative.

C compiled once and loaded with ctypes (``kernels.native_build``); :func:`available` is False where the CPU lacks
AVX-512 BF16 or nothing compiles, and the callers keep torch's ops (also for float16, for ranks over 64 and for
rows that are not contiguous). ``NATIVE`` (module flag) turns the wiring off.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from finetune_studio.kernels import native_build

log = logging.getLogger(__name__)

NATIVE = True  # the callers use lora_backward_products where runs_on() says it can run
PARALLEL = True  # the rows' parts shared among torch's threads (False: one thread; the same numbers)

MAX_RANK = 64

SOURCE = (
    r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
"""
    + native_build.BF16_PS
    + r"""
int cpu_lora_bwd_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#define ROWS 64

/* 16 bf16 (masked) widened to the low halves of 32-bit lanes */
AVX512BW static inline __m512i lanes(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}

/* one chunk of rr <= 16 ranks: gb[:, :rr] = g b (b [out, rr], rows sb apart), gradb[:, :rr] = s g^T xa */
AVX512BW static void chunk(const uint16_t* g, int64_t sg, const uint16_t* b, int64_t sb, const uint16_t* xa,
                           int64_t sx, float s, int64_t n, int64_t out, int rr, uint16_t* gbs, int64_t sgs,
                           uint16_t* gbr, int64_t sgr, float* gradb, int64_t sgb, uint32_t* bpair, float* gbt) {
  __mmask16 rm = (__mmask16)((1u << rr) - 1);
  /* bpair[p] (16 lanes): b's rows 2p and 2p + 1 interleaved, what vdpbf16ps multiplies (g[i, 2p], g[i, 2p+1]) with */
  for (int64_t p = 0; p < (out + 1) / 2; p++) {
    __m512i lo = lanes(b + 2 * p * sb, rm);
    __m512i hi = 2 * p + 1 < out ? lanes(b + (2 * p + 1) * sb, rm) : _mm512_setzero_si512();
    _mm512_store_si512(bpair + p * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
  if (gradb) memset(gbt, 0, sizeof(float) * rr * out);
  float acc_gb[ROWS * 16] __attribute__((aligned(64)));
  uint32_t xpair[ROWS / 2 * 16] __attribute__((aligned(64)));
  for (int64_t n0 = 0; n0 < n; n0 += ROWS) {
    int64_t rows = n - n0 < ROWS ? n - n0 : ROWS, pairs = (rows + 1) / 2;
    if (gradb)
      for (int64_t p = 0; p < pairs; p++) { /* xa's rows 2p, 2p + 1 of the block interleaved (a zero row past n) */
        int64_t i = n0 + 2 * p;
        __m512i lo = lanes(xa + i * sx, rm), hi = i + 1 < n ? lanes(xa + (i + 1) * sx, rm) : _mm512_setzero_si512();
        _mm512_store_si512(xpair + p * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    memset(acc_gb, 0, sizeof(float) * 16 * rows);
    for (int64_t o0 = 0; o0 < out; o0 += 16) {
      int oc = out - o0 < 16 ? (int)(out - o0) : 16;
      __mmask16 om = (__mmask16)((1u << oc) - 1);
      if (gradb) { /* B's gradient for 16 outputs (lanes), each rank's sums in a register over the block's rows */
        __m512 acc[16];
        for (int k = 0; k < 16; k++)
          acc[k] = k < rr ? _mm512_maskz_loadu_ps(om, gbt + k * out + o0) : _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
          int64_t i = n0 + 2 * p;
          _mm_prefetch((const char*)(g + i * sg + o0 + 64), _MM_HINT_T0); /* two chunks ahead (never faults) */
          _mm_prefetch((const char*)(g + (i + 1) * sg + o0 + 64), _MM_HINT_T0);
          __m512i lo = lanes(g + i * sg + o0, om);
          __m512i hi = i + 1 < n ? lanes(g + (i + 1) * sg + o0, om) : _mm512_setzero_si512();
          __m512bh gv = (__m512bh)_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
          const uint32_t* xp = xpair + p * 16;
          for (int k = 0; k < 16; k++)
            acc[k] = _mm512_dpbf16_ps(acc[k], gv, (__m512bh)_mm512_set1_epi32((int)xp[k]));
        }
        for (int k = 0; k < 16; k++)
          if (k < rr) _mm512_mask_storeu_ps(gbt + k * out + o0, om, acc[k]);
      }
      /* gb: each row's sum over these outputs, two outputs a step, eight rows at a time */
      const uint32_t* bp = bpair + o0 / 2 * 16;
      int even = oc & ~1;
      int64_t i = 0;
      for (; i + 8 <= rows; i += 8) {
        const uint16_t* gr = g + (n0 + i) * sg + o0;
        __m512 a[8];
        for (int q = 0; q < 8; q++) a[q] = _mm512_setzero_ps();
        for (int j = 0; j < even; j += 2) {
          __m512bh bv = (__m512bh)_mm512_load_si512(bp + j / 2 * 16);
          for (int q = 0; q < 8; q++) {
            uint32_t v;
            memcpy(&v, gr + q * sg + j, 4);
            a[q] = _mm512_dpbf16_ps(a[q], (__m512bh)_mm512_set1_epi32((int)v), bv);
          }
        }
        if (even < oc) { /* the last odd output: its pair's second half is zero in both operands */
          __m512bh bv = (__m512bh)_mm512_load_si512(bp + even / 2 * 16);
          for (int q = 0; q < 8; q++) a[q] = _mm512_dpbf16_ps(a[q], (__m512bh)_mm512_set1_epi32(gr[q * sg + even]), bv);
        }
        for (int q = 0; q < 8; q++) {
          float* t = acc_gb + (i + q) * 16;
          _mm512_store_ps(t, _mm512_add_ps(_mm512_load_ps(t), a[q]));
        }
      }
      for (; i < rows; i++) {
        const uint16_t* gr = g + (n0 + i) * sg + o0;
        __m512 a0 = _mm512_setzero_ps();
        for (int j = 0; j < even; j += 2) {
          uint32_t v0;
          memcpy(&v0, gr + j, 4);
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)v0), (__m512bh)_mm512_load_si512(bp + j / 2 * 16));
        }
        if (even < oc)
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(gr[even]),
                                (__m512bh)_mm512_load_si512(bp + even / 2 * 16));
        float* t = acc_gb + i * 16;
        _mm512_store_ps(t, _mm512_add_ps(_mm512_load_ps(t), a0));
      }
    }
    __m512 sv = _mm512_set1_ps(s);
    for (int64_t i = 0; i < rows; i++) {
      __m512 v = _mm512_load_ps(acc_gb + i * 16);
      if (gbr) _mm256_mask_storeu_epi16(gbr + (n0 + i) * sgr, rm, to_bf16_int(v));
      if (gbs) _mm256_mask_storeu_epi16(gbs + (n0 + i) * sgs, rm, to_bf16_int(_mm512_mul_ps(v, sv)));
    }
  }
  if (gradb) /* gbt is B's gradient transposed, unscaled */
    for (int64_t o = 0; o < out; o++)
      for (int k = 0; k < rr; k++) gradb[o * sgb + k] = gbt[k * out + o] * s;
}

/* g [n, out] bf16 (rows sg apart), b [out, r] bf16 (contiguous), xa [n, r] bf16 (rows sx apart): gbs [n, r] =
   bf16(s g b) (rows sgs apart; NULL: not written), gbr [n, r] = bf16(g b) (rows sgr apart; NULL: not written),
   gradb [out, r] float32 contiguous = s g^T xa (NULL: not computed; xa may be NULL then). The rows go in an even
   number of equal parts of about PART rows, shared among `threads` threads; B's gradient is each part's sum, then
   the parts' sums added in order (the same numbers for any thread count). Returns 0, or -1 where a scratch buffer
   could not be allocated. */
#define PART 128
AVX512BW int lora_bwd(const uint16_t* g, int64_t sg, const uint16_t* b, const uint16_t* xa, int64_t sx, float s,
                      int64_t n, int64_t out, int64_t r, uint16_t* gbs, int64_t sgs, uint16_t* gbr, int64_t sgr,
                      float* gradb, int threads) {
  int64_t parts = n > PART ? (n + 2 * PART - 1) / (2 * PART) * 2 : 1;
  size_t pairs_bytes = (size_t)((out + 1) / 2) * 64 + 64;
  size_t scratch_bytes = pairs_bytes + (size_t)(16 * out * 4 + 64) / 64 * 64;
  float* partial = 0; /* [parts, out, r]: each part's B gradient (only with several parts) */
  if (gradb && parts > 1) {
    partial = aligned_alloc(64, ((size_t)parts * out * r * 4 + 63) / 64 * 64);
    if (!partial) return -1;
  }
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && parts > 1) reduction(| : failed)
  for (int64_t p = 0; p < parts; p++) {
    int64_t r0 = p * n / parts, rows = (p + 1) * n / parts - r0;
    uint32_t* bpair = aligned_alloc(64, scratch_bytes);
    if (!bpair) {
      failed = 1;
      continue;
    }
    float* gbt = (float*)((char*)bpair + pairs_bytes); /* [rr, out]: B's gradient's sums, transposed */
    float* gb_part = gradb ? (partial ? partial + (size_t)p * out * r : gradb) : 0;
    for (int64_t k = 0; k < r; k += 16) {
      int rr = r - k < 16 ? (int)(r - k) : 16;
      chunk(g + r0 * sg, sg, b + k, r, xa ? xa + r0 * sx + k : 0, sx, s, rows, out, rr,
            gbs ? gbs + r0 * sgs + k : 0, sgs, gbr ? gbr + r0 * sgr + k : 0, sgr, gb_part ? gb_part + k : 0, r,
            bpair, gbt);
    }
    free(bpair);
  }
  if (partial) {
    if (!failed)
      for (int64_t i = 0; i < out * r; i++) {
        float sum = partial[i];
        for (int64_t p = 1; p < parts; p++) sum += partial[(size_t)p * out * r + i];
        gradb[i] = sum;
      }
    free(partial);
  }
  return failed ? -1 : 0;
}
"""
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("cpu_lora_backward", SOURCE)
    if lib is None:
        return None
    if not lib.cpu_lora_bwd_supported():
        log.info("cpu_lora_backward: this CPU lacks AVX-512 BF16; the rank-r products stay torch's")
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.lora_bwd.argtypes = [
        pointer, size, pointer, pointer, size, ctypes.c_float, size, size, size, pointer, size, pointer, size, pointer,
        ctypes.c_int,
    ]  # fmt: skip
    lib.lora_bwd.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel runs here (builds it on the first call: about a second)."""
    return _library() is not None


def _rows_ok(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(1) == 1


def runs_on(g: torch.Tensor, xa: torch.Tensor | None, rank: int) -> bool:
    """Whether ``lora_backward_products`` takes these operands: the flag on, bf16 CPU 2-D tensors with contiguous rows
    (a column block of a wider buffer is fine), a rank up to ``MAX_RANK``, and the kernel built."""
    return NATIVE and 0 < rank <= MAX_RANK and _rows_ok(g) and (xa is None or _rows_ok(xa)) and available()


def lora_backward_products(
    g: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor | None,
    scaling: float,
    gb_scaled_out: torch.Tensor | None = None,
    gb_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One pass over g ([N, out] bf16, rows contiguous; check :func:`runs_on`): writes ``bf16(s * g B)`` into
    ``gb_scaled_out`` and ``bf16(g B)`` into ``gb_out`` (each [N, r] bf16 with contiguous rows, e.g. columns of a
    wider buffer; None: not written), and returns B's gradient ``s g^T xa`` as a new float32 [out, r] tensor
    (None when ``xa`` is None). ``lora_b`` [out, r] in any float dtype (rounded to bf16, as torch's path does)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("cpu_lora_backward: the kernel is not available here (check available() first)")
    n, out = g.shape
    r = lora_b.shape[1]
    if tuple(lora_b.shape) != (out, r) or not runs_on(g, xa, r):
        raise ValueError("lora_backward_products: g [N, out] and xa [N, r] bf16 with contiguous rows, lora_b [out, r]")
    if xa is not None and tuple(xa.shape) != (n, r):
        raise ValueError(f"lora_backward_products: xa must be [{n}, {r}], got {list(xa.shape)}")
    for name, t in (("gb_scaled_out", gb_scaled_out), ("gb_out", gb_out)):
        if t is not None and (not _rows_ok(t) or tuple(t.shape) != (n, r)):
            raise ValueError(f"lora_backward_products: {name} must be a bf16 [{n}, {r}] tensor with contiguous rows")
    b = lora_b.to(torch.bfloat16).contiguous()
    grad_b = None if xa is None else torch.empty(out, r, dtype=torch.float32, device=g.device)
    done = lib.lora_bwd(
        g.data_ptr(),
        g.stride(0),
        b.data_ptr(),
        None if xa is None else xa.data_ptr(),
        0 if xa is None else xa.stride(0),
        float(scaling),
        n,
        out,
        r,
        None if gb_scaled_out is None else gb_scaled_out.data_ptr(),
        0 if gb_scaled_out is None else gb_scaled_out.stride(0),
        None if gb_out is None else gb_out.data_ptr(),
        0 if gb_out is None else gb_out.stride(0),
        None if grad_b is None else grad_b.data_ptr(),
        torch.get_num_threads() if PARALLEL else 1,
    )
    if done != 0:
        raise MemoryError("lora_backward_products: could not allocate the kernel's scratch buffer")
    return grad_b
