"""Integer products on the CPU (AVX-512 VNNI) for the int8 layers when decoding, one row or several.

:mod:`engine.decoding.int8`'s weights (int8, one bfloat16 scale per output row) multiplied by the activations
quantised on the fly to int16, one float32 scale per row (``d = max|x_row| / 32767``: 16 bits where llama.cpp's
q8_0 quantises its activations to 8 bits in blocks of 32), with ``vpdpwssd`` (32 products of int16 pairs an
instruction, summed in int32), and each output is ``scale * d * sum``, the bias added, in float32. Measured against
float32 on the bundled model (``benchmarks/decode_bench.py``) it is closer than the bfloat16 products it replaces
(the activations keep 16 bits and the logits are float32 rather than bfloat16).

The kernel reads each weight in a packed copy (:func:`packed`, made at the first product and kept while the weight
lives: one more byte a weight): blocks of 16 output rows, each pair of inputs' 16 x 2 bytes after the previous
pair's, widened to int16 in a register and multiplied with the pair of a row's activations broadcast to the 16
lanes, so each of the 16 int32 lanes sums one output and no horizontal sums are needed; one weight load serves up
to 8 rows. Against reading the int8 weight rows as they are (a sum per output and row over 16 lanes at the end):
a whole model's products (the bundled model, one thread) 7.2 -> 5.8 ms at one row, 24.1 -> 14.2 at 8 and 101 -> 63
at 42 (a prefill). Decoding one token reads every weight once, so one row is bound by memory traffic (one byte a
weight, read in order), 8 rows by the ``vpdpwssd`` (about 1.5 cycles each here). A row's numbers do not depend
on the rows around it (each row is quantised alone and summed in the same order whatever the batch).

The kernel is C, compiled once by ``kernels.native_build`` with the system's C compiler (``$CC``, else ``cc``) into
the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, ``finetune-studio/kernels``), loaded with ctypes and
run on torch's thread count (OpenMP: torch's own runtime, already loaded). :func:`available` is False (and the int8
layers keep torch's kernels) where the CPU lacks AVX-512 VNNI or nothing compiles; the log says why.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import weakref

import torch

from finetune_studio.kernels import native_build

log = logging.getLogger(__name__)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define SEGMENT 512 /* int32 sums over at most this many inputs: |sum| <= 512 * 127 * 32767 < 2^31 */

int int8_dot_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* x (M, K) float32 -> q (M, Kp) int16 (Kp: K rounded up to 2, zero padded) and d (M): x ~= q * d per row, q the
   nearest integer (ties to even, as lrintf), 16 at a time. */
VNNI static void quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int16_t* q, float* d) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    int16_t* qr = q + m * Kp;
    __m512 top = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = _mm512_reduce_max_ps(top);
    for (; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
    float id = amax > 0.f ? 32767.f / amax : 0.f;
    d[m] = amax / 32767.f;
    __m512 scale = _mm512_set1_ps(id);
    for (k = 0; k + 16 <= K; k += 16) {
      __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), scale));
      _mm256_storeu_si256((__m256i*)(qr + k), _mm512_cvtsepi32_epi16(r));
    }
    for (; k < K; k++) qr[k] = (int16_t)lrintf(xr[k] * id);
    for (k = K; k < Kp; k++) qr[k] = 0;
  }
}

/* acc (16 int32 lanes, one per output) += w (16 outputs x 2 int16) . the pair a[0], a[1] (int16, broadcast from
   memory); inline assembly because gcc copies every accumulator around the intrinsic's tied operand. */
VNNI static inline __m512i dpwssd(__m512i acc, __m512i w, const int16_t* a) {
  __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t*)a));
  return acc;
}

typedef void (*tile_fn_t)(const int8_t*, int64_t, int64_t, const int16_t*, const float*, const uint16_t*,
                          const float*, float*, int64_t);

/* Outputs 16 nb .. 16 nb + 15 for MT activation rows, from the packed weight: per block of 16 outputs, per pair of
   inputs, 32 bytes (16 outputs x 2 inputs), read in order and widened to int16 once for the MT rows. Each lane
   sums its own output (no horizontal sums), in int32 over SEGMENT inputs, then in float32. */
#define TILE(MT)                                                                                                   \
  VNNI static void tile_##MT(const int8_t* w, int64_t Kp, int64_t nb, const int16_t* q, const float* d,             \
                             const uint16_t* scale, const float* bias, float* y, int64_t N) {                      \
    __m512 sum[MT];                                                                                                \
    for (int m = 0; m < MT; m++) sum[m] = _mm512_setzero_ps();                                                     \
    const int8_t* wb = w + nb * 16 * Kp;                                                                           \
    for (int64_t k0 = 0; k0 < Kp; k0 += SEGMENT) {                                                                 \
      int64_t k1 = k0 + SEGMENT < Kp ? k0 + SEGMENT : Kp;                                                          \
      __m512i acc[MT];                                                                                             \
      for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_si512();                                                \
      for (int64_t k = k0; k < k1; k += 2) {                                                                       \
        __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wb + k * 16)));                      \
        for (int m = 0; m < MT; m++) acc[m] = dpwssd(acc[m], wv, q + m * Kp + k);                                  \
      }                                                                                                            \
      for (int m = 0; m < MT; m++) sum[m] = _mm512_add_ps(sum[m], _mm512_cvtepi32_ps(acc[m]));                     \
    }                                                                                                              \
    int64_t n0 = nb * 16;                                                                                          \
    __mmask16 keep = N - n0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1);                         \
    __m512i s16 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, scale + n0));                               \
    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(s16, 16)); /* bfloat16 -> float32 */                          \
    __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();                                \
    for (int m = 0; m < MT; m++)                                                                                   \
      _mm512_mask_storeu_ps(y + m * N + n0, keep,                                                                  \
                            _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(d[m])), sum[m], b));                   \
  }

TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)

static const tile_fn_t tiles[9] = {NULL, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6, tile_7, tile_8};


/* y (M, N) float32 = x (M, K) float32 @ (w * scale (N) bfloat16)^T + bias (N) float32 or NULL, each row of x
   quantised to int16; w: the int8 weight (N, K) packed by int8_dot_pack. Returns 0, or -1 where scratch memory was
   not available. */
int int8_dot_gemm(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, const float* bias,
                  int64_t N, float* y, int threads) {
  int64_t Kp = (K + 1) / 2 * 2, blocks = (N + 15) / 16;
  if (M <= 0) return 0;
  int16_t* q = aligned_alloc(64, ((size_t)M * (size_t)Kp * 2 + 63) / 64 * 64);
  float* d = malloc((size_t)M * sizeof(float));
  if (!q || !d) {
    free(q);
    free(d);
    return -1;
  }
  quantize(x, M, K, Kp, q, d);
  for (int64_t m0 = 0; m0 < M;) {
    int64_t mt = M - m0 >= 8 ? 8 : M - m0; /* one pass over the weight for up to 8 rows */
    tile_fn_t tile = tiles[mt];
    const int16_t* qm = q + m0 * Kp;
    const float* dm = d + m0;
    float* ym = y + m0 * N;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t nb = 0; nb < blocks; nb++) tile(w, Kp, nb, qm, dm, scale, bias, ym, N);
    m0 += mt;
  }
  free(q);
  free(d);
  return 0;
}
"""


def load_library(name: str, source: str) -> ctypes.CDLL | None:
    """C ``source`` (which includes :data:`SOURCE`) compiled once into the cache folder and loaded, or None where
    this machine cannot (no compiler, no AVX-512 VNNI: the log says which)."""
    lib = native_build.load(name, source)  # None where nothing compiles here (the log says why)
    if lib is None:
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


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) int8 in the kernel's layout: blocks of 16 outputs (the last one padded with zero rows),
    each one pair of inputs after another (``in`` padded to even), 16 outputs x 2 inputs a pair: (blocks, pairs,
    16, 2), contiguous. One more byte a weight, read in order."""
    out_f, in_f = weight.shape
    padded = torch.nn.functional.pad(weight, (0, in_f % 2, 0, -out_f % 16))
    return padded.view(-1, 16, padded.shape[1] // 2, 2).transpose(1, 2).contiguous()


_packed: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}  # id(weight) -> (it, version, packed)


def version(t: torch.Tensor) -> int:
    """``t``'s version counter (in-place changes count up), -1 for an inference tensor (which has none)."""
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor: no version counter (and no in-place change outside inference mode)
        return -1


def packed(weight: torch.Tensor) -> torch.Tensor:
    """:func:`pack` of ``weight``, made once and kept while ``weight`` lives unchanged (its version counter). A view of
    whole rows of a larger int8 weight (the int8 layers' projections are views of their stacks) starting at a
    multiple of 16 rows is a view of its base's packed weight: one packed copy for both."""
    base = weight._base
    usable = base is not None and base.dtype == torch.int8 and base.dim() == 2 and base.is_contiguous()
    if usable and base is not None and base.shape[1] == weight.shape[1] and weight.is_contiguous():
        first, rest = divmod(int(weight.storage_offset() - base.storage_offset()), int(weight.shape[1]))
        if rest == 0 and first % 16 == 0:
            return _packed_whole(base)[first // 16 : (first + weight.shape[0] + 15) // 16]
    return _packed_whole(weight)


def _packed_whole(weight: torch.Tensor) -> torch.Tensor:
    key, now = id(weight), version(weight)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == now:
        return entry[2]
    with torch.no_grad():
        result = pack(weight.detach())
    _packed[key] = (weakref.ref(weight, functools.partial(_forget, key)), now, result)
    return result


def _forget(key: int, _gone: object) -> None:  # the weight is gone: its packed copy too
    _packed.pop(key, None)


def int8_dot_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` with each row of ``x`` quantised to int16: ``x`` (M, in) float32,
    ``weight`` (out, in) int8 and ``scale`` (out,) bfloat16, both contiguous, ``bias`` (out,) float32 or None;
    returns (M, out) float32. The caller checks :func:`available` and those dtypes and layouts. The first call
    with a weight packs it (:func:`packed`)."""
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
        packed(weight).data_ptr(),
        scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        weight.shape[0],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if done != 0:
        raise MemoryError("int8_dot_matmul: no memory for the quantised activations")
    return out
