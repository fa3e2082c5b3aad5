"""Integer products on the CPU (AVX-512 VNNI) for the int4 layers when decoding: llama.cpp's q4_0 x q8_0 scheme.

:mod:`engine.decoding.int4`'s weights (codes 0..15 in groups of ``group_size`` inputs, one bfloat16 scale ``s``
and zero ``z`` a group: ``W ~= (q - 8) s + z``) multiplied by the activations quantised on the fly to int8 in
blocks of 32 inputs, one float32 scale a block (``d = max|x_block| / 127``, as llama.cpp's q8_0), with
``vpdpbusd`` (64 products of an unsigned byte, the code, by a signed byte, the activation, an instruction, summed
in int32). Per block of 32 inputs and output: ``sum = codes . xq`` exactly in int32, then in float32
``y += s * d * (sum - 8 * sum(xq)) + z * d * sum(xq)`` (the zero point through the block's activation sum, the
``- 8`` exact in integers); the bias added at the end.

The kernel reads each weight in a packed copy (:func:`pack`, made when the layer is quantised): blocks of 16
outputs, and per block of 32 inputs 320 bytes: the 16 outputs' ``(s, z)`` bfloat16 pairs (one 32-bit lane each),
then four 64-byte loads of codes, each 16 lanes of 4 bytes, a lane's byte ``j`` holding input ``j`` in its low
nibble and input ``j + 4`` in its high one; one AND and one shift-and-AND unpack a load into two registers of
u8 codes for 8 inputs, each multiplied by 4 activation bytes broadcast to the 16 lanes, so every lane sums one
output (no horizontal sums). Groups of 64 or 128 inputs repeat their scales in each block of 32 (a layout for
one group size). 5 bits a weight, against int8's 8: one row is bound by memory traffic. One weight load serves
up to 8 rows. A row's numbers do not depend on the rows around it (each row quantised alone, summed in the same
order whatever the batch).

Compiled with :mod:`engine.decoding.int8_dot`'s builder (the same cache folder and fallbacks): :func:`available`
is False where the CPU lacks AVX-512 VNNI or nothing compiles, and the int4 layers keep torch's int4 kernel.
"""

from __future__ import annotations

import ctypes
import functools
import weakref

import torch

from finetune_studio.engine.decoding import int8_dot

BLOCK = 32  # inputs per activation block (and per block of the packed layout)

SOURCE = r"""
/* x (M, K) float32 -> q (M, K) int8 and per block of 32 inputs d (M, K/32) float32 and sums (M, K/32) int32 of q:
   x ~= q * d per block, q the nearest integer (ties to even). K a multiple of 32. */
VNNI static void quantize_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* sums) {
  int64_t nb = K / 32;
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < nb; b++) {
      const float* xb = x + m * K + b * 32;
      __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      float id = amax > 0.f ? 127.f / amax : 0.f;
      __m512 scale = _mm512_set1_ps(id);
      __m512i r0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, scale)), r1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, scale));
      _mm_storeu_si128((__m128i*)(q + m * K + b * 32), _mm512_cvtsepi32_epi8(r0));
      _mm_storeu_si128((__m128i*)(q + m * K + b * 32 + 16), _mm512_cvtsepi32_epi8(r1));
      d[m * nb + b] = amax / 127.f;
      sums[m * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(r0, r1));
    }
}

/* acc (16 int32 lanes, one per output) += w (16 outputs x 4 u8) . a[0..3] (s8, broadcast from memory). */
VNNI static inline __m512i dpbusd(__m512i acc, __m512i w, const int8_t* a) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t*)a));
  return acc;
}

typedef void (*tile4_fn_t)(const uint8_t*, int64_t, int64_t, const int8_t*, const float*, const int32_t*,
                           const float*, float*, int64_t);

/* Outputs 16 nb .. 16 nb + 15 for MT rows from the packed weight (per block of 32 inputs: 64 bytes of (s, z)
   pairs, then 4 x 64 bytes of codes). */
#define TILE4(MT)                                                                                                  \
  VNNI static void tile4_##MT(const uint8_t* w, int64_t K, int64_t nb, const int8_t* q, const float* d,            \
                              const int32_t* sums, const float* bias, float* y, int64_t N) {                      \
    int64_t blocks = K / 32;                                                                                       \
    const uint8_t* wb = w + nb * blocks * 320;                                                                     \
    const __m512i low = _mm512_set1_epi8(0x0f), top = _mm512_set1_epi32((int)0xffff0000u);                        \
    __m512 sum[MT];                                                                                                \
    for (int m = 0; m < MT; m++) sum[m] = _mm512_setzero_ps();                                                     \
    for (int64_t b = 0; b < blocks; b++, wb += 320) {                                                              \
      __m512i sz = _mm512_loadu_si512((const void*)wb);                                                            \
      __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16)), z = _mm512_castsi512_ps(_mm512_and_si512(sz, top)); \
      __m512i acc[MT];                                                                                             \
      for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_si512();                                                \
      for (int c = 0; c < 4; c++) {                                                                                \
        __m512i v = _mm512_loadu_si512((const void*)(wb + 64 + 64 * c));                                           \
        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                \
        for (int m = 0; m < MT; m++) {                                                                             \
          const int8_t* a = q + m * K + b * 32 + 8 * c;                                                            \
          acc[m] = dpbusd(acc[m], lo, a);                                                                          \
          acc[m] = dpbusd(acc[m], hi, a + 4);                                                                      \
        }                                                                                                          \
      }                                                                                                            \
      for (int m = 0; m < MT; m++) {                                                                               \
        int32_t total = sums[m * blocks + b];                                                                      \
        float dm = d[m * blocks + b];                                                                              \
        __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], _mm512_set1_epi32(8 * total)));                    \
        sum[m] = _mm512_fmadd_ps(s, _mm512_mul_ps(f, _mm512_set1_ps(dm)), sum[m]);                                 \
        sum[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(dm * (float)total), sum[m]);                                    \
      }                                                                                                            \
    }                                                                                                              \
    int64_t n0 = nb * 16;                                                                                          \
    __m512 bv = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();                                           \
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(y + m * N + n0, _mm512_add_ps(sum[m], bv));                      \
  }

TILE4(1) TILE4(2) TILE4(3) TILE4(4) TILE4(5) TILE4(6) TILE4(7) TILE4(8)

static const tile4_fn_t tiles4[9] = {NULL, tile4_1, tile4_2, tile4_3, tile4_4, tile4_5, tile4_6, tile4_7, tile4_8};

/* y (M, N) float32 = x (M, K) float32 @ W^T + bias (N) float32 or NULL, each row of x quantised to int8 in blocks
   of 32; w: the int4 weight packed by int4_dot.pack (N a multiple of 16, K of 32). Returns 0, or -1 where scratch
   memory was not available. */
int int4_dot_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* bias, int64_t N, float* y,
                  int threads) {
  int64_t blocks = K / 32, nbs = N / 16;
  if (M <= 0) return 0;
  int8_t* q = malloc((size_t)(M * K));
  float* d = malloc(sizeof(float) * (size_t)(M * blocks));
  int32_t* sums = malloc(sizeof(int32_t) * (size_t)(M * blocks));
  if (!q || !d || !sums) {
    free(q); free(d); free(sums);
    return -1;
  }
  quantize_q8(x, M, K, q, d, sums);
  for (int64_t m0 = 0; m0 < M;) {
    int64_t mt = M - m0 >= 8 ? 8 : M - m0;
    tile4_fn_t tile = tiles4[mt];
    const int8_t* qm = q + m0 * K;
    const float* dm = d + m0 * blocks;
    const int32_t* sm = sums + m0 * blocks;
    float* ym = y + m0 * N;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t nb = 0; nb < nbs; nb++) tile(w, K, nb, qm, dm, sm, bias, ym, N);
    m0 += mt;
  }
  free(q); free(d); free(sums);
  return 0;
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = int8_dot.load_library("int4_dot", int8_dot.SOURCE + SOURCE)
    if lib is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.int4_dot_gemm.argtypes = [pointer, size, size, pointer, pointer, size, pointer, ctypes.c_int]
    lib.int4_dot_gemm.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether :func:`int4_dot_matmul` runs here (builds the kernel on the first call: about a second)."""
    return _library() is not None


def fits(in_features: int, out_features: int) -> bool:
    """Whether the kernel takes an ``(out_features, in_features)`` weight (int4's own shapes always do)."""
    return in_features % BLOCK == 0 and out_features % 16 == 0


def pack(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernel's layout of an int4 weight: ``codes`` (out, in) in [0, 15] and ``scales_zeros`` (in / group, out,
    2) as :func:`engine.decoding.int4.quantize_int4` makes them (rounded to bfloat16 here, as the int4 layers keep
    them) -> (out / 16, in / 32, 320) uint8, contiguous: per block of 16 outputs and 32 inputs, the 16 ``(s, z)``
    bfloat16 pairs, then 4 x 16 outputs x 4 bytes of codes (byte ``j`` of chunk ``c``: input ``8 c + j`` low
    nibble, ``8 c + 4 + j`` high)."""
    out_f, in_f = codes.shape
    if not fits(in_f, out_f) or group_size % BLOCK:
        raise ValueError(f"int4_dot: a ({out_f}, {in_f}) weight in groups of {group_size} does not fit the kernel")
    blocks = in_f // BLOCK
    c = codes.to(torch.uint8).reshape(out_f // 16, 16, blocks, 4, 2, 4)  # (nb, lane, block, chunk, half, byte)
    nibbles = (c[:, :, :, :, 0, :] | (c[:, :, :, :, 1, :] << 4)).permute(0, 2, 3, 1, 4)  # (nb, block, chunk, lane, j)
    sz = scales_zeros.to(torch.bfloat16).contiguous().view(torch.int16).view(torch.uint8)  # (groups, out, 4)
    sz = sz.repeat_interleave(group_size // BLOCK, dim=0)  # one copy per block of 32 inputs
    sz = sz.reshape(blocks, out_f // 16, 64).transpose(0, 1)  # (nb, block, 16 lanes x (s, z))
    return torch.cat([sz, nibbles.reshape(out_f // 16, blocks, 256)], dim=2).contiguous()


_packs: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}  # id(int4 weight) -> (it, kernel's packing)


def register(weight: torch.Tensor, packed: torch.Tensor) -> None:
    """Keep ``packed`` (:func:`pack`) as the kernel's copy of the int4 layer weight ``weight`` while it lives."""
    key = id(weight)
    _packs[key] = (weakref.ref(weight, functools.partial(_forget, key)), packed)


def packed_for(weight: torch.Tensor) -> torch.Tensor | None:
    """The kernel's copy of ``weight`` given to :func:`register`, or None."""
    entry = _packs.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else None


def _forget(key: int, _gone: object) -> None:
    _packs.pop(key, None)


def int4_dot_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with each row of ``x`` quantised to int8 in blocks of 32: ``x`` (M, in) float32,
    ``packed`` :func:`pack`'s (out / 16, in / 32, 320), ``bias`` (out,) float32 contiguous or None; returns (M, out)
    float32. The caller checks :func:`available`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("int4_dot_matmul: the kernel is not available here (check available() first)")
    x = x.contiguous()
    rows, inner = x.shape
    out_f = packed.shape[0] * 16
    if inner != packed.shape[1] * BLOCK or packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(f"int4_dot_matmul: x has {inner} inputs, the packed weight {packed.shape[1] * BLOCK}")
    out = torch.empty(rows, out_f, dtype=torch.float32, device=x.device)
    done = lib.int4_dot_gemm(
        x.data_ptr(),
        rows,
        inner,
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out_f,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if done != 0:
        raise MemoryError("int4_dot_matmul: no memory for the quantised activations")
    return out
