"""RMSNorm's forward and backward in one pass over each row of float32 CPU tensors (AVX-512), for ``kernels.rms_norm``.

torch computes the forward (``x.pow(2)``, ``mean``, ``+ eps``, ``rsqrt``, ``x * rstd``, ``weight * n``) as six ops and
the backward (``n = x rstd``, ``gn = dy w``, ``gn n``, ``mean``, ``n * m``, ``gn - .``, ``rstd * .``) as about
eight, each a trip through memory for a [tokens, hidden] tensor. ``rms_norm_forward_native`` reads x once per row
(its sum of squares and the output while the row is in the cache) and writes y and rstd; ``rms_norm_backward_native``
reads dy and x once per row and writes dx:

    rstd = 1 / sqrt(mean(x^2) + eps),   y = w * (x * rstd)
    n = x * rstd,  gn = dy * w,  dx = rstd * (gn - n * mean(gn * n))

The same formulas as ``kernels.rms_norm``'s torch path, in float32; the sums run in another order (16 lanes, then
across them), so results agree to float32 rounding, not bit for bit. The weight's gradient (a trained norm weight)
stays torch's. With AVX-512 BW/VL/BF16 (:func:`bf16_available`) the forward can write y in bf16 (the float32 y
rounded once, as ``.to(torch.bfloat16)`` rounds it) and the backward read a bf16 dy (widened as it is read), for a
consumer that rounds y to bf16 anyway: no float32 y and no casts each way.

C compiled once and loaded with ctypes (``kernels.native_build``), rows split over torch's thread count;
:func:`available` is False where the CPU lacks AVX-512 or nothing compiles, and ``kernels.rms_norm`` keeps torch's
ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from finetune_studio.kernels import native_build

log = logging.getLogger(__name__)

SOURCE = (
    r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#define AVX512 __attribute__((target("avx512f")))

int cpu_rms_norm_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

static inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

/* 1 / sqrt(mean(x^2) + eps) of a row of n */
AVX512 static inline float row_rstd(const float* xr, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = _mm512_maskz_loadu_ps(tail(n - i), xr + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return 1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
}

/* y = w * (x * rstd) per row of n; rstd = 1 / sqrt(mean(x^2) + eps) unless given (given != 0: read from rstd) */
AVX512 void rms_norm_fwd(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t n, float eps,
                         int given, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float s = given ? rstd[r] : (rstd[r] = row_rstd(xr, n, eps));
    __m512 sv = _mm512_set1_ps(s);
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = tail(n - i);
      __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
      _mm512_mask_storeu_ps(yr + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_mul_ps(v, sv)));
    }
  }
}

/* dx = rstd * (gn - n * mean(gn * n)) per row, n = x * rstd, gn = dy * w */
AVX512 void rms_norm_bwd(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int64_t rows,
                         int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * n, *dr = dy + r * n;
    float* out = dx + r * n;
    __m512 sv = _mm512_set1_ps(rstd[r]);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = tail(n - i);
      __m512 nv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), sv);
      __m512 gn = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dr + i), _mm512_maskz_loadu_ps(m, w + i));
      acc = _mm512_fmadd_ps(gn, nv, acc);
    }
    __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / (float)n);
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = tail(n - i);
      __m512 nv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), sv);
      __m512 gn = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dr + i), _mm512_maskz_loadu_ps(m, w + i));
      _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(sv, _mm512_fnmadd_ps(nv, mean, gn)));
    }
  }
}
"""
    + native_build.BF16_PS
    + r"""
int cpu_rms_norm_bf16_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* as rms_norm_fwd, y rounded to bf16 once (the float32 value rms_norm_fwd writes, to nearest even); 32 columns a
   block */
AVX512BW void rms_norm_fwd_bf16(const float* x, const float* w, uint16_t* y, float* rstd, int64_t rows, int64_t n,
                                float eps, int given, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * n;
    uint16_t* yr = y + r * n;
    float s = given ? rstd[r] : (rstd[r] = row_rstd(xr, n, eps));
    __m512 sv = _mm512_set1_ps(s);
    for (int64_t i = 0; i < n; i += 32) {
      __mmask16 lo = tail(n - i), hi = n - i > 16 ? tail(n - i - 16) : 0;
      __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(lo, w + i), _mm512_mul_ps(_mm512_maskz_loadu_ps(lo, xr + i), sv));
      __m512 b = _mm512_mul_ps(_mm512_maskz_loadu_ps(hi, w + i + 16),
                               _mm512_mul_ps(_mm512_maskz_loadu_ps(hi, xr + i + 16), sv));
      __m512i v = to_bf16_pair(a, b);
      if (n - i >= 32)
        _mm512_storeu_si512(yr + i, v);
      else
        _mm512_mask_storeu_epi16(yr + i, (__mmask32)lo | ((__mmask32)hi << 16), v);
    }
  }
}

/* as rms_norm_bwd, dy in bf16, widened to float32 as it is read: the same numbers as rms_norm_bwd over dy.float() */
AVX512BW void rms_norm_bwd_bf16(const uint16_t* dy, const float* x, const float* w, const float* rstd, float* dx,
                                int64_t rows, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * n;
    const uint16_t* dr = dy + r * n;
    float* out = dx + r * n;
    __m512 sv = _mm512_set1_ps(rstd[r]);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = tail(n - i);
      __m512 nv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), sv);
      __m512 gn = _mm512_mul_ps(from_bf16(_mm256_maskz_loadu_epi16(m, dr + i)), _mm512_maskz_loadu_ps(m, w + i));
      acc = _mm512_fmadd_ps(gn, nv, acc);
    }
    __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / (float)n);
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = tail(n - i);
      __m512 nv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), sv);
      __m512 gn = _mm512_mul_ps(from_bf16(_mm256_maskz_loadu_epi16(m, dr + i)), _mm512_maskz_loadu_ps(m, w + i));
      _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(sv, _mm512_fnmadd_ps(nv, mean, gn)));
    }
  }
}
"""
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("cpu_rms_norm", SOURCE)
    if lib is None:
        return None
    if not lib.cpu_rms_norm_supported():
        log.info("cpu_rms_norm: this CPU lacks AVX-512; RMSNorm stays torch's ops")
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.rms_norm_fwd.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_float, ctypes.c_int]
    lib.rms_norm_fwd.argtypes.append(ctypes.c_int)
    lib.rms_norm_fwd.restype = None
    lib.rms_norm_bwd.argtypes = [pointer, pointer, pointer, pointer, pointer, size, size, ctypes.c_int]
    lib.rms_norm_bwd.restype = None
    lib.rms_norm_fwd_bf16.argtypes = lib.rms_norm_fwd.argtypes
    lib.rms_norm_fwd_bf16.restype = None
    lib.rms_norm_bwd_bf16.argtypes = lib.rms_norm_bwd.argtypes
    lib.rms_norm_bwd_bf16.restype = None
    return lib


def available() -> bool:
    """Whether the native RMSNorm runs here (builds it on the first call: about a second)."""
    return _library() is not None


def bf16_available() -> bool:
    """Whether the bf16-output forward and bf16-gradient backward run here (AVX-512 BW, VL and BF16 too)."""
    lib = _library()
    return lib is not None and bool(lib.cpu_rms_norm_bf16_supported())


def runs_on(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the kernel: float32 CPU tensors whose last dimension is the first's (the
    input, the gradient, the weight), and the kernel built."""
    n = tensors[0].shape[-1]
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.shape[-1] == n for t in tensors) and (
        available()
    )


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("cpu_rms_norm: the kernel is not available here (check available() first)")
    return lib


def rms_norm_forward_native(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    rstd: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``weight * (x * rstd)``, rstd [..., 1]) for float32 CPU tensors (check :func:`runs_on`); with ``rstd`` given
    (a recompute) it is used, not computed. ``out_dtype=torch.bfloat16`` (check :func:`bf16_available`): the output
    written in bf16, the float32 output rounded once to nearest even (``.to(torch.bfloat16)``'s bits; a NaN stays a
    NaN, its bits may differ)."""
    lib = _lib()
    bf16 = out_dtype == torch.bfloat16
    if out_dtype not in (torch.float32, torch.bfloat16) or (bf16 and not bf16_available()):
        raise ValueError(f"cpu_rms_norm: no {out_dtype} output here (float32, or bf16 where bf16_available())")
    n = x.shape[-1]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)
    given = rstd is not None
    r = rstd.contiguous() if rstd is not None else torch.empty(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    rows = x.numel() // n if n else 0
    if r.numel() != rows or weight.numel() != n:
        raise ValueError(f"cpu_rms_norm: rstd {list(r.shape)}, weight {list(weight.shape)} do not fit {list(x.shape)}")
    kernel = lib.rms_norm_fwd_bf16 if bf16 else lib.rms_norm_fwd
    kernel(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), r.data_ptr(), rows, n, eps, int(given), torch.get_num_threads()
    )
    return out, r


def rms_norm_backward_native(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The input's gradient of ``weight * (x * rstd)`` for the output's gradient ``grad`` (float32 CPU tensors; a
    bf16 ``grad`` where :func:`bf16_available`, widened as it is read: the numbers of ``grad.float()``)."""
    lib = _lib()
    bf16 = grad.dtype == torch.bfloat16
    if grad.dtype not in (torch.float32, torch.bfloat16) or (bf16 and not bf16_available()):
        raise ValueError(f"cpu_rms_norm: no {grad.dtype} gradient here (float32, or bf16 where bf16_available())")
    n = x.shape[-1]
    grad, x, weight, rstd = grad.contiguous(), x.contiguous(), weight.contiguous(), rstd.contiguous()
    d_x = torch.empty_like(x)
    rows = x.numel() // n if n else 0
    if rstd.numel() != rows or weight.numel() != n or grad.shape != x.shape:
        raise ValueError(f"cpu_rms_norm: grad {list(grad.shape)}, rstd {list(rstd.shape)} do not fit x {list(x.shape)}")
    ptrs = (grad.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), d_x.data_ptr())
    (lib.rms_norm_bwd_bf16 if bf16 else lib.rms_norm_bwd)(*ptrs, rows, n, torch.get_num_threads())
    return d_x
