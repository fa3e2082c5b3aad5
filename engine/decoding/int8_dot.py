"""Integer products on the CPU (AVX-512 VNNI) for the int8 layers when decoding, one row or several.

:mod:`engine.decoding.int8`'s weights (int8, one bfloat16 scale per output row) multiplied by the activations
quantised on the fly to int16, one float32 scale per row (``d = max|x_row| / 32767``: 16 bits where llama.cpp's
q8_0 quantises its activations to 8 bits in blocks of 32), with ``vpdpwssd`` (32 products of int16 pairs an
instruction, summed in int32): the weights are widened to int16 in registers, one load shared by up to 8 rows,
and each output is ``scale * d * sum``, the bias added, in float32. Measured against float32 on the bundled model
(``benchmarks/decode_bench.py``) it is closer than the bfloat16 products it replaces (the activations keep 16 bits
and the logits are float32 rather than bfloat16).

Decoding one token reads every weight once, so one row is bound by memory traffic: one byte a weight, read in
order (about the machine's streaming bandwidth on one core), against the bfloat16 (``torch._weight_int8pack_mm``)
or float32 (the compiled one-row product) conversions those do first. A row's numbers do not depend on the rows
around it (each row is quantised alone and summed in the same order whatever the batch).

The kernel is C, compiled once with the system's C compiler (``$CC``, else ``cc``) into the user's cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache``, ``finetune-studio/kernels``), loaded with ctypes and run on torch's thread
count (OpenMP: torch's own runtime, already loaded). :func:`available` is False (and the int8 layers keep
torch's kernels) where the CPU lacks AVX-512 VNNI or nothing compiles; the log says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define SEGMENT 4096 /* int32 sums over at most this many inputs: |sum| < 4096 / 16 * 2 * 127 * 32767 < 2^31 */

int int8_dot_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* x (M, K) float32 -> q (M, Kp) int16 (Kp: K rounded up to 32, zero padded) and d (M): x ~= q * d per row. */
static void quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int16_t* q, float* d) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    int16_t* qr = q + m * Kp;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
    float id = amax > 0.f ? 32767.f / amax : 0.f;
    d[m] = amax / 32767.f;
    for (int64_t k = 0; k < K; k++) qr[k] = (int16_t)lrintf(xr[k] * id);
    for (int64_t k = K; k < Kp; k++) qr[k] = 0;
  }
}

/* acc += w (32 int16) . a (32 int16, from memory) pairwise into 16 int32 lanes; inline assembly because gcc copies
   every accumulator around the intrinsic's tied operand (twice the instructions). */
VNNI static inline __m512i dpwssd(__m512i acc, __m512i w, const int16_t* a) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const __m512i*)a));
  return acc;
}

static inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Output row n for MT activation rows: one weight row at a time, read in order (several rows interleaved defeat
   the hardware prefetcher: measured half the bandwidth), widened to int16 once for the MT rows. */
#define TILE(MT)                                                                                                   \
  VNNI static void tile_##MT(const int8_t* w, int64_t K, int64_t Kp, int64_t n, const int16_t* q, const float* d,   \
                             const uint16_t* scale, const float* bias, float* y, int64_t N) {                      \
    float part[MT];                                                                                                \
    for (int m = 0; m < MT; m++) part[m] = 0.f;                                                                    \
    const int8_t* wr = w + n * K;                                                                                  \
    for (int64_t k0 = 0; k0 < K; k0 += SEGMENT) {                                                                  \
      int64_t k1 = k0 + SEGMENT < K ? k0 + SEGMENT : K, body = k0 + (k1 - k0) / 32 * 32;                           \
      __m512i acc[MT];                                                                                             \
      for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_si512();                                                \
      for (int64_t k = k0; k < body; k += 32) {                                                                    \
        __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + k)));                          \
        for (int m = 0; m < MT; m++) acc[m] = dpwssd(acc[m], wv, q + m * Kp + k);                                  \
      }                                                                                                            \
      if (body < k1) {                                                                                             \
        __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(((__mmask32)1 << (k1 - body)) - 1, wr + body)); \
        for (int m = 0; m < MT; m++) acc[m] = dpwssd(acc[m], wv, q + m * Kp + body);                               \
      }                                                                                                            \
      for (int m = 0; m < MT; m++) part[m] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[m]));                    \
    }                                                                                                              \
    float s = bf16_to_float(scale[n]), b = bias ? bias[n] : 0.f;                                                   \
    for (int m = 0; m < MT; m++) y[m * N + n] = s * d[m] * part[m] + b;                                            \
  }

TILE(1) TILE(2) TILE(4) TILE(8)

typedef void (*tile_fn)(const int8_t*, int64_t, int64_t, int64_t, const int16_t*, const float*, const uint16_t*,
                        const float*, float*, int64_t);

/* y (M, N) float32 = x (M, K) float32 @ (w (N, K) int8 * scale (N) bfloat16)^T + bias (N) float32 or NULL, each row
   of x quantised to int16. Returns 0, or -1 where scratch memory was not available. */
int int8_dot_gemm(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, const float* bias,
                  int64_t N, float* y, int threads) {
  int64_t Kp = (K + 31) / 32 * 32;
  int16_t* q = aligned_alloc(64, (size_t)M * (size_t)Kp * 2);
  float* d = malloc((size_t)M * sizeof(float));
  if (!q || !d) {
    free(q);
    free(d);
    return -1;
  }
  quantize(x, M, K, Kp, q, d);
  for (int64_t m0 = 0; m0 < M;) {
    int64_t mt = M - m0 >= 8 ? 8 : M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
    tile_fn tile = mt == 1 ? tile_1 : mt == 2 ? tile_2 : mt == 4 ? tile_4 : tile_8;
    const int16_t* qm = q + m0 * Kp;
    const float* dm = d + m0;
    float* ym = y + m0 * N;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t n = 0; n < N; n++) tile(w, K, Kp, n, qm, dm, scale, bias, ym, N);
    m0 += mt;
  }
  free(q);
  free(d);
  return 0;
}
"""


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune-studio" / "kernels"


def _build(source: str, target: Path) -> None:
    """Compile C ``source`` to ``target`` (a shared library), through a temporary file renamed at the end."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or "cc"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source_file, built = Path(tmp) / "kernel.c", Path(tmp) / target.name
        source_file.write_text(source, encoding="utf-8")
        for openmp in (["-fopenmp"], []):  # without OpenMP (a compiler lacking it): one thread, the same numbers
            command = [compiler, "-O3", "-shared", "-fPIC", *openmp, "-o", str(built), str(source_file), "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-800:]}")
        os.replace(built, target)


def load_library(name: str, source: str) -> ctypes.CDLL | None:
    """C ``source`` (which includes :data:`SOURCE`) compiled once into the cache folder and loaded, or None where
    this machine cannot (no compiler, no AVX-512 VNNI: the log says which)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # AVX-512 is x86's
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = _cache_folder() / f"{name}-{digest}.so"
    try:
        if not target.is_file():
            _build(source, target)
            for old in target.parent.glob(f"{name}-*.so"):  # earlier versions' builds
                if old != target:
                    old.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(target))
    except Exception as exc:  # no compiler, a read-only home, an unsupported platform
        log.warning("int8: the int8 x int16 kernel is not available (%s: %s)", type(exc).__name__, exc)
        return None
    if not lib.int8_dot_supported():
        log.info("int8: this CPU lacks AVX-512 VNNI; the int8 layers keep torch's kernels")
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.int8_dot_gemm.argtypes = [pointer, size, size, pointer, pointer, pointer, size, pointer, ctypes.c_int]
    lib.int8_dot_gemm.restype = ctypes.c_int
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library("int8_dot", SOURCE)


def available() -> bool:
    """Whether :func:`int8_dot_matmul` runs here (builds the kernel on the first call: about a second)."""
    return _library() is not None


def int8_dot_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` with each row of ``x`` quantised to int16: ``x`` (M, in) float32,
    ``weight`` (out, in) int8 and ``scale`` (out,) bfloat16, both contiguous, ``bias`` (out,) float32 or None;
    returns (M, out) float32. The caller checks :func:`available` and those dtypes and layouts."""
    lib = _library()
    if lib is None:
        raise RuntimeError("int8_dot_matmul: the kernel is not available here (check available() first)")
    x = x.contiguous()
    rows, inner = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=x.device)
    done = lib.int8_dot_gemm(
        x.data_ptr(),
        rows,
        inner,
        weight.data_ptr(),
        scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        weight.shape[0],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if done != 0:
        raise MemoryError("int8_dot_matmul: no memory for the quantised activations")
    return out
