"""A whole decoding step in C for int8 and int4 Llama-family models: the decode loop's fast step without Python.

One answer's step on the bundled model is 121 products and some 900 small torch operations (norms, rotary, views,
cache writes, residual adds), each paying Python's and the dispatcher's few microseconds: measured 8.6 ms of a
27 ms step before this. :func:`native_step` does the whole step in one call into C: the embedding row, then per
block the RMS norm, the stacked q/k/v product (:mod:`engine.decoding.int8_dot`'s int8 x int16 products), the
rotary embedding, the key and value written into the preallocated cache in place, attention (grouped query heads,
float32, over each row's attended positions), the output projection, the residual, the norm, the stacked gate/up
product, SiLU(gate) * up, the down projection, the residual; then the final norm and the int8 head into float32
logits. The same operations, in the same precision, as the fast step over the int8 layers with the int8 x int16
products (tested equal within float32's rounding). An int4 model's block products are
:mod:`engine.decoding.int4_dot`'s q4_0 x q8_0 products instead (its head stays int8, as :mod:`engine.decoding.int4`
keeps it), again the Python fast step's numbers. The C is compiled for AVX-512 (the CPU the products need):
attention's dot products 16 floats at a time, each key read once for the query heads that share it, a row's
weighted values kept in registers for heads of 64 and 128 (8 rows at 106 cached positions on the bundled model:
24.1 -> 19.4 ms a step with the packed products; 1 row 7.4 -> 6.5). Each row is computed alone, the same whatever
the rows around it.

It applies where every projection is a plain int8 or int4 linear with its stacks, or a PEFT LoRA layer over one:
the adapters' A x and B (A x) are added on the side in C, B read transposed (16 outputs a lane each, no horizontal
sums; a copy made when the step is built and made again before a step where a B changed in place, so the
adapters' weights are read live). Merged adapters, DoRA and other variants, dropout in training mode keep the
Python fast step (which calls the adapter layers). Otherwise (another model family, an int4 head, rotary scaling
that changes with the length, no AVX-512 VNNI or no C compiler) :func:`native_step` answers None and the fast
step is used as before.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from finetune_studio.engine.decoding import int4_dot, int8_dot
from finetune_studio.engine.decoding.int4 import GROUPS as INT4_GROUPS
from finetune_studio.engine.decoding.int8 import GROUPS

STEP_SOURCE = r"""
typedef struct {
  const float* in_norm;
  const float* post_norm;
  const int8_t* qkv_w; const uint16_t* qkv_s; const float* qkv_b;
  const int8_t* o_w; const uint16_t* o_s; const float* o_b;
  const int8_t* gu_w; const uint16_t* gu_s; const float* gu_b;
  const int8_t* down_w; const uint16_t* down_s; const float* down_b;
  float* k_buf; /* (rows, kv heads, capacity, head dim) */
  float* v_buf;
  int64_t int4; /* bit p set: product p (q/k/v, o, gate/up, down) is int4 (w: int4_dot's packing, s unused) */
} block_t;

/* One of the block's products: int8 x int16 (int8_dot) or int4 x int8 in blocks of 32 (int4_dot). */
static int product(const block_t* b, int which, const float* x, int64_t M, int64_t K, const void* w,
                   const uint16_t* s, const float* bias, int64_t N, float* y, int threads) {
  if (b->int4 >> which & 1) return int4_dot_gemm(x, M, K, (const uint8_t*)w, bias, N, y, threads);
  return int8_dot_gemm(x, M, K, (const int8_t*)w, s, bias, N, y, threads);
}

typedef struct {
  int64_t block, target; /* target: 0 the q/k/v stack, 1 o, 2 the gate/up stack, 3 down */
  int64_t offset, out, in, rank; /* the adapted projection's first output in its product, its shape, the rank */
  const float* a; /* (rank, in) */
  const float* b; /* B transposed: (rank, out) */
  float scaling;
} lora_t;

/* y[:, offset : offset + out] += scaling * B (A x) for the block's adapters on this target (PEFT's LoRA: on the side
   of the base product, not merged into it). */
VNNI static int add_lora(const lora_t* loras, int64_t count, int64_t block, int64_t target, const float* x, int64_t ldx,
                    float* y, int64_t ldy, int64_t M) {
  for (int64_t i = 0; i < count; i++) {
    const lora_t* l = loras + i;
    if (l->block != block || l->target != target) continue;
    float* t = malloc(sizeof(float) * l->rank * M); /* (M, rank): each row's A x */
    if (!t) return -1;
    for (int64_t r = 0; r < l->rank; r++) { /* A's row read once for every row of x */
      const float* ar = l->a + r * l->in;
      for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * ldx;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < l->in; k++) s += ar[k] * xr[k];
        t[m * l->rank + r] = s;
      }
    }
    /* 16 outputs at a time, one lane each (no horizontal sums): B's column r for those outputs (a row of B
       transposed) read once for every row of x, times the row's (A x)[r] broadcast */
    for (int64_t j0 = 0; j0 < l->out; j0 += 16) {
      __mmask16 keep = l->out - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (l->out - j0)) - 1);
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        int64_t mt = M - m0 < 8 ? M - m0 : 8;
        __m512 acc[8];
        for (int64_t m = 0; m < mt; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t r = 0; r < l->rank; r++) {
          __m512 column = _mm512_maskz_loadu_ps(keep, l->b + r * l->out + j0);
          for (int64_t m = 0; m < mt; m++)
            acc[m] = _mm512_fmadd_ps(column, _mm512_set1_ps(t[(m0 + m) * l->rank + r]), acc[m]);
        }
        for (int64_t m = 0; m < mt; m++) {
          float* ym = y + (m0 + m) * ldy + l->offset + j0;
          __m512 sum = _mm512_fmadd_ps(acc[m], _mm512_set1_ps(l->scaling), _mm512_maskz_loadu_ps(keep, ym));
          _mm512_mask_storeu_ps(ym, keep, sum);
        }
      }
    }
    free(t);
  }
  return 0;
}

VNNI static void rms_norm(const float* x, const float* weight, float eps, int64_t M, int64_t H, float* out) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * H;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < H; i++) s += xr[i] * xr[i];
    float r = 1.f / sqrtf(s / (float)H + eps);
    for (int64_t i = 0; i < H; i++) out[m * H + i] = weight[i] * (xr[i] * r);
  }
}

/* x (D) rotated in place: x * cos + rotate_half(x) * sin, cos/sin of (position * inv_freq) * scaling. */
VNNI static void rotate(float* x, const float* cosv, const float* sinv, int64_t D) {
  int64_t h = D / 2;
  for (int64_t i = 0; i < h; i++) {
    float a = x[i], b = x[i + h];
    x[i] = a * cosv[i] - b * sinv[i];
    x[i + h] = b * cosv[i + h] + a * sinv[i + h];
  }
}

/* a . b over D floats (16 at a time where D allows). */
VNNI static inline float dot(const float* a, const float* b, int64_t D) {
  if (D % 16) {
    float s = 0.f;
    for (int64_t i = 0; i < D; i++) s += a[i] * b[i];
    return s;
  }
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
  return _mm512_reduce_add_ps(s);
}

/* scores (G, n) = attn_scale * q (G, D) . keys[p] (n, D) for the G query heads of one key head; -inf where mk[p]
   is 0 (mk NULL: every position). Each key is read once for the G heads. */
VNNI static void group_scores(const float* q, int64_t G, const float* keys, const uint8_t* mk, int64_t n, int64_t D,
                              float attn_scale, float* scores) {
  for (int64_t p = 0; p < n; p++) {
    if (mk && !mk[p]) {
      for (int64_t j = 0; j < G; j++) scores[j * n + p] = -INFINITY;
      continue;
    }
    for (int64_t j = 0; j < G; j++) scores[j * n + p] = dot(q + j * D, keys + p * D, D) * attn_scale;
  }
}

/* o (D) = sum of w[p] * values[p] (n rows of D) over the nonzero w, the sum kept in registers for D 64 and 128. */
#define WEIGHTED(DV)                                                                                               \
  VNNI static void weighted_##DV(const float* w, const float* values, int64_t n, float* o) {                       \
    __m512 acc[DV / 16];                                                                                           \
    for (int v = 0; v < DV / 16; v++) acc[v] = _mm512_setzero_ps();                                                \
    for (int64_t p = 0; p < n; p++) {                                                                              \
      if (w[p] == 0.f) continue;                                                                                   \
      __m512 wp = _mm512_set1_ps(w[p]);                                                                            \
      const float* vp = values + p * DV;                                                                           \
      for (int v = 0; v < DV / 16; v++) acc[v] = _mm512_fmadd_ps(wp, _mm512_loadu_ps(vp + 16 * v), acc[v]);       \
    }                                                                                                              \
    for (int v = 0; v < DV / 16; v++) _mm512_storeu_ps(o + 16 * v, acc[v]);                                        \
  }
WEIGHTED(64) WEIGHTED(128)

VNNI static void weighted_sum(const float* w, const float* values, int64_t n, int64_t D, float* o) {
  if (D == 64) return weighted_64(w, values, n, o);
  if (D == 128) return weighted_128(w, values, n, o);
  for (int64_t i = 0; i < D; i++) o[i] = 0.f;
  for (int64_t p = 0; p < n; p++) {
    if (w[p] == 0.f) continue;
    for (int64_t i = 0; i < D; i++) o[i] += w[p] * values[p * D + i];
  }
}

/* One decoding step for M rows (one new token each). Returns 0, -1 without scratch memory, -2 where a product
   failed. positions: each row's rotary position (NULL: length for every row); mask: M rows of capacity bytes
   (stride mask_stride), nonzero where the row attends to that position (NULL: every position up to length). */
VNNI int native_step(const int64_t* ids, int64_t M, const float* embed, int64_t H, int64_t L, const block_t* blocks,
                int64_t heads, int64_t kv_heads, int64_t D, int64_t inter, float eps, float attn_scale,
                const float* inv_freq, float rope_scaling, const int64_t* positions, int64_t length, int64_t cap,
                const uint8_t* mask, int64_t mask_stride, const float* final_norm, const int8_t* head_w,
                const uint16_t* head_s, int64_t V, float* logits, const lora_t* loras, int64_t lora_count,
                int threads) {
  int64_t QKV = (heads + 2 * kv_heads) * D, groups = heads / kv_heads;
  float* x = malloc(sizeof(float) * M * H);
  float* h = malloc(sizeof(float) * M * H);
  float* t = malloc(sizeof(float) * M * H);
  float* qkv = malloc(sizeof(float) * M * QKV);
  float* att = malloc(sizeof(float) * M * heads * D);
  float* gu = malloc(sizeof(float) * M * 2 * inter);
  float* act = malloc(sizeof(float) * M * inter);
  float* scores = malloc(sizeof(float) * (length + 1) * groups);
  float* cs = malloc(sizeof(float) * M * 2 * D);
  int rc = 0;
  if (!x || !h || !t || !qkv || !att || !gu || !act || !scores || !cs) {
    rc = -1;
    goto done;
  }
  for (int64_t m = 0; m < M; m++) {
    memcpy(x + m * H, embed + ids[m] * H, sizeof(float) * H);
    float pos = (float)(positions ? positions[m] : length);
    for (int64_t i = 0; i < D; i++) {
      float f = pos * inv_freq[i % (D / 2)];
      cs[m * 2 * D + i] = cosf(f) * rope_scaling;
      cs[m * 2 * D + D + i] = sinf(f) * rope_scaling;
    }
  }
  for (int64_t l = 0; l < L; l++) {
    const block_t* b = blocks + l;
    rms_norm(x, b->in_norm, eps, M, H, h);
    if (product(b, 0, h, M, H, b->qkv_w, b->qkv_s, b->qkv_b, QKV, qkv, threads)) { rc = -2; goto done; }
    if (add_lora(loras, lora_count, l, 0, h, H, qkv, QKV, M)) { rc = -1; goto done; }
    for (int64_t m = 0; m < M; m++) {
      float* row = qkv + m * QKV;
      const float* c = cs + m * 2 * D;
      for (int64_t j = 0; j < heads + kv_heads; j++) rotate(row + j * D, c, c + D, D);
      for (int64_t g = 0; g < kv_heads; g++) {
        memcpy(b->k_buf + ((m * kv_heads + g) * cap + length) * D, row + (heads + g) * D, sizeof(float) * D);
        memcpy(b->v_buf + ((m * kv_heads + g) * cap + length) * D, row + (heads + kv_heads + g) * D,
               sizeof(float) * D);
      }
      const uint8_t* mk = mask ? mask + m * mask_stride : NULL;
      for (int64_t g = 0; g < kv_heads; g++) { /* the query heads that share key/value head g, each key read once */
        const float* keys = b->k_buf + (m * kv_heads + g) * cap * D;
        const float* values = b->v_buf + (m * kv_heads + g) * cap * D;
        group_scores(row + g * groups * D, groups, keys, mk, length + 1, D, attn_scale, scores);
        for (int64_t j = 0; j < groups; j++) {
          float* sj = scores + j * (length + 1);
          float top = -INFINITY, total = 0.f;
          for (int64_t p = 0; p <= length; p++) top = sj[p] > top ? sj[p] : top;
          for (int64_t p = 0; p <= length; p++) {
            sj[p] = sj[p] == -INFINITY ? 0.f : expf(sj[p] - top);
            total += sj[p];
          }
          for (int64_t p = 0; p <= length; p++) sj[p] /= total;
          weighted_sum(sj, values, length + 1, D, att + (m * heads + g * groups + j) * D);
        }
      }
    }
    if (product(b, 1, att, M, heads * D, b->o_w, b->o_s, b->o_b, H, t, threads)) { rc = -2; goto done; }
    if (add_lora(loras, lora_count, l, 1, att, heads * D, t, H, M)) { rc = -1; goto done; }
    for (int64_t i = 0; i < M * H; i++) x[i] += t[i];
    rms_norm(x, b->post_norm, eps, M, H, h);
    if (product(b, 2, h, M, H, b->gu_w, b->gu_s, b->gu_b, 2 * inter, gu, threads)) { rc = -2; goto done; }
    if (add_lora(loras, lora_count, l, 2, h, H, gu, 2 * inter, M)) { rc = -1; goto done; }
    for (int64_t m = 0; m < M; m++)
      for (int64_t i = 0; i < inter; i++) {
        float g = gu[m * 2 * inter + i], u = gu[m * 2 * inter + inter + i];
        act[m * inter + i] = g / (1.f + expf(-g)) * u;
      }
    if (product(b, 3, act, M, inter, b->down_w, b->down_s, b->down_b, H, t, threads)) { rc = -2; goto done; }
    if (add_lora(loras, lora_count, l, 3, act, inter, t, H, M)) { rc = -1; goto done; }
    for (int64_t i = 0; i < M * H; i++) x[i] += t[i];
  }
  rms_norm(x, final_norm, eps, M, H, h);
  if (int8_dot_gemm(h, M, H, head_w, head_s, NULL, V, logits, threads)) rc = -2;
done:
  free(x); free(h); free(t); free(qkv); free(att); free(gu); free(act); free(scores); free(cs);
  return rc;
}
"""

_FIELDS = ["in_norm", "post_norm"]
_FIELDS += [f"{p}_{k}" for p in ("qkv", "o", "gu", "down") for k in ("w", "s", "b")]
_FIELDS += ["k_buf", "v_buf"]


class _Block(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _FIELDS] + [("int4", ctypes.c_int64)]


class _Lora(ctypes.Structure):
    _fields_ = [
        ("block", ctypes.c_int64),
        ("target", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("out", ctypes.c_int64),
        ("in_", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("scaling", ctypes.c_float),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = int8_dot.load_library("native_step", int8_dot.SOURCE + int4_dot.SOURCE + STEP_SOURCE)
    if lib is None:
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.native_step.argtypes = [p, i, p, i, i, p, i, i, i, i, f, f, p, f, p, i, i, p, i, p, p, p, i, p, p, i]
    lib.native_step.argtypes += [ctypes.c_int]
    lib.native_step.restype = ctypes.c_int
    return lib


ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at load (dynamic types change it with the length)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _int8(module: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(int8 weight, bfloat16 scale, float32 bias or None) of a plain int8 linear the C step can read, else None."""
    if type(module) is not nn.Linear or not hasattr(module, "int8_weight"):
        return None
    w, s, b = cast(torch.Tensor, module.int8_weight), cast(torch.Tensor, module.int8_scale), module.bias
    return _checked(w, s, None if b is None else b.detach())


Product = tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]
"""(0 int8 / 1 int4, the kernel's packed weight, the int8 scale or None, float32 bias or None, outputs)."""


def _product(module: object) -> Product | None:
    """A plain int8 or int4 linear as the C step reads it, else None."""
    if type(module) is not nn.Linear:
        return None
    if hasattr(module, "int4_weight"):
        packed = int4_dot.packed_for(cast(torch.Tensor, module.int4_weight))
        bias = None if module.bias is None else module.bias.detach()
        if packed is None or (bias is not None and not _float32(bias)):
            return None
        return 1, packed, None, bias, module.out_features
    part = _int8(module)
    return None if part is None else (0, int8_dot.packed(part[0]), part[1], part[2], module.out_features)


def _stack(parent: nn.Module, names: tuple[str, ...]) -> tuple[Product, list[torch.Tensor]] | None:
    """``parent``'s int8 or int4 stack of ``names`` as the C step reads it, and each projection's packed rows the
    stack must begin with at its offset; None where there is none."""
    int8_name = next(k for k, v in GROUPS.items() if v == names)
    int4_name = next(k for k, v in INT4_GROUPS.items() if v == names)
    if hasattr(parent, f"{int8_name}_weight"):
        w, sc, bias = (getattr(parent, f"{int8_name}_{k}") for k in ("weight", "scale", "bias"))
        part = _checked(w, sc, bias)
        if part is None:
            return None
        return (0, int8_dot.packed(w), sc, bias, int(w.shape[0])), [w]
    if hasattr(parent, f"{int4_name}_weight"):
        w, bias = getattr(parent, f"{int4_name}_weight"), getattr(parent, f"{int4_name}_bias")
        packed = int4_dot.packed_for(w)
        if packed is None or (bias is not None and not _float32(bias)):
            return None
        return (1, packed, None, bias, packed.shape[0] * 16), [packed]
    return None


def _rows_of(base: nn.Linear, kind: int) -> torch.Tensor | None:
    """The weight (int8) or the kernel's packed copy (int4) of ``base`` whose first row the stack's must be."""
    if kind == 0:
        return cast(torch.Tensor, base.int8_weight) if hasattr(base, "int8_weight") else None
    return int4_dot.packed_for(cast(torch.Tensor, base.int4_weight)) if hasattr(base, "int4_weight") else None


def _base(module: object) -> nn.Linear | None:
    """The linear under ``module``: itself where it is a plain ``nn.Linear``, the base layer of a PEFT LoRA layer."""
    if type(module) is nn.Linear:
        return module
    base = getattr(module, "base_layer", None)
    return base if _is_lora(module) and type(base) is nn.Linear else None


def _is_lora(module: object) -> bool:
    if not type(module).__module__.startswith("peft."):
        return False
    from peft.tuners.lora.layer import Linear as LoraLinear

    return type(module) is LoraLinear


def _lora_terms(module: Any) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """(A, B, scaling) of each adapter PEFT applies on the side of ``module`` (none for a plain linear or with the
    adapters switched off); None where the C step cannot apply them as PEFT does (merged, DoRA and other variants,
    dropout in training mode, a bias on B, other dtypes)."""
    if type(module) is nn.Linear:
        return []
    if not _is_lora(module) or module.merged:
        return None
    if module.disable_adapters:
        return []
    terms: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}):
            return None
        a, b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if type(dropout) is not nn.Identity and not (type(dropout) is nn.Dropout and not dropout.training):
            return None
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return None
        if not (_float32(a.weight) and _float32(b.weight)):
            return None
        terms.append((a.weight.detach(), b.weight.detach(), float(module.scaling[name])))
    return terms


def _checked(
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    if w.dtype != torch.int8 or s.dtype != torch.bfloat16 or not (w.is_contiguous() and s.is_contiguous()):
        return None
    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
        return None
    return w, s, b


def _float32(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"


Step = Callable[..., torch.Tensor]


def use_native_step(on: bool) -> bool:
    """Switch the C step on (where it applies) or off (the Python fast step); return whether it was on."""
    global _native_on
    was, _native_on = _native_on, on
    return was


_native_on = True


def native_step(model: Any, cache: Any, fallback: Step) -> Step | None:
    """The C decoding step for ``model`` (int8 weights, a Llama-family model the fast step takes) writing into
    ``cache`` (its preallocated layers), with the signature of the fast step; ``fallback`` (the fast step) runs what
    the C step does not (several new positions per row: checking drafted tokens). None where it does not apply."""
    lib = _library() if _native_on else None
    if lib is None:
        return None
    inner, config = model.model, model.config
    rotary = inner.rotary_emb
    if getattr(rotary, "rope_type", "default") not in ROPE_TYPES or not _float32(getattr(rotary, "inv_freq", None)):
        return None
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return None
    if type(inner.embed_tokens) is not nn.Embedding or not _float32(inner.embed_tokens.weight):
        return None
    embed: torch.Tensor = inner.embed_tokens.weight
    head = _int8(model.lm_head)
    if head is None or head[2] is not None or type(inner.norm).__name__ not in RMS_NORMS:
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    blocks = []
    loras: list[tuple[int, int, int, torch.Tensor, torch.Tensor, float]] = []  # (block, target, offset, A, B, scale)
    if not _float32(inner.norm.weight):
        return None
    for index, block in enumerate(inner.layers[: config.num_hidden_layers]):
        attn, mlp = block.self_attn, block.mlp
        d = attn.head_dim
        norms = (block.input_layernorm, block.post_attention_layernorm)
        if any(type(n).__name__ not in RMS_NORMS or not _float32(n.weight) for n in norms):
            return None
        parts: list[Product] = []
        qkv_names, gate_up_names = GROUPS["int8_qkv"], GROUPS["int8_gate_up"]
        for parent, names, target in ((attn, qkv_names, 0), (attn, ("o_proj",), 1), (mlp, gate_up_names, 2)):
            modules = [getattr(parent, n, None) for n in names]
            bases = [_base(m) for m in modules]
            if any(b is None for b in bases):
                return None
            stacked = _stack(parent, names) if len(names) > 1 else None
            if len(names) > 1 and stacked is None:
                return None
            part = stacked[0] if stacked is not None else _product(bases[0])
            if part is None:
                return None
            offset = 0
            for module, base in zip(modules, bases, strict=True):
                terms = _lora_terms(module)
                if base is None or terms is None:
                    return None  # an adapter the C step cannot apply as PEFT does: the fast step calls it
                if stacked is not None:  # the stack must still be made of these projections' weights
                    rows = _rows_of(base, part[0])
                    unit = 1 if part[0] == 0 else 16  # int4's packing: a block of 16 outputs a row
                    if rows is None or offset % unit or rows.data_ptr() != stacked[1][0][offset // unit].data_ptr():
                        return None
                loras += [(index, target, offset, la, lb, scaling) for la, lb, scaling in terms]
                offset += base.out_features
            parts.append(part)
        down, terms = _base(mlp.down_proj), _lora_terms(mlp.down_proj)
        down_part = _product(down)
        if down_part is None or terms is None:
            return None
        loras += [(index, 3, 0, la, lb, scaling) for la, lb, scaling in terms]
        qkv_part, o_part, gate_up_part = parts
        if qkv_part[4] != (heads + 2 * kv_heads) * d or gate_up_part[4] % 2:
            return None
        blocks.append((block, [qkv_part, o_part, gate_up_part, down_part]))
    layers = cache.layers
    if not all(_float32(layer.k_buf) and _float32(layer.v_buf) for layer in layers):
        return None
    d, hidden = inner.layers[0].self_attn.head_dim, config.hidden_size
    inter = blocks[0][1][2][4] // 2
    eps = float(inner.layers[0].input_layernorm.variance_epsilon)
    if any(float(b.input_layernorm.variance_epsilon) != eps for b, _ in blocks):
        return None
    table = (_Block * len(blocks))()
    kept: list[torch.Tensor] = []  # the packed weights the table points at (int8_dot keeps them too, while they live)
    for entry, (block, products) in zip(table, blocks, strict=True):
        entry.in_norm = block.input_layernorm.weight.data_ptr()
        entry.post_norm = block.post_attention_layernorm.weight.data_ptr()
        entry.int4 = 0
        for which, (prefix, (kind, w, s, b, _)) in enumerate(zip(("qkv", "o", "gu", "down"), products, strict=True)):
            kept.append(w)
            entry.int4 |= kind << which
            setattr(entry, f"{prefix}_w", w.data_ptr())
            setattr(entry, f"{prefix}_s", None if s is None else s.data_ptr())
            setattr(entry, f"{prefix}_b", None if b is None else b.data_ptr())
    table_loras = (_Lora * max(1, len(loras)))()
    for entry, (index, target, offset, la, lb, scaling) in zip(table_loras, loras, strict=False):
        entry.block, entry.target, entry.offset = index, target, offset
        entry.out, entry.in_, entry.rank = lb.shape[0], la.shape[1], la.shape[0]
        entry.a, entry.scaling = la.data_ptr(), scaling
    transposed: list[tuple[int, torch.Tensor]] = []  # each B's (version, B transposed), the table's b

    def read_b() -> None:  # B transposed, again where a B changed (the adapters' weights are read live)
        if transposed and all(int8_dot.version(lb) == v for (v, _), (*_, lb, _) in zip(transposed, loras)):
            return
        transposed[:] = [(int8_dot.version(lb), lb.detach().t().contiguous()) for *_, lb, _ in loras]
        for entry, (_, bt) in zip(table_loras, transposed, strict=False):
            entry.b = bt.data_ptr()

    known: list[int] = [-1]  # the first layer's key buffer the table points at
    head_packed = int8_dot.packed(head[0])

    def step(
        ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows, t = ids.shape
        if t != 1 or layers[0].k_buf.shape[0] != rows:  # (rows: a cache reshaped behind the step's back)
            return fallback(ids, positions, mask)
        length = layers[0].length
        if length + 1 > layers[0].k_buf.shape[2]:  # past the planned length: grow (as the cache's update does)
            for layer in layers:
                layer.k_buf = torch.cat([layer.k_buf, torch.empty_like(layer.k_buf)], dim=2)
                layer.v_buf = torch.cat([layer.v_buf, torch.empty_like(layer.v_buf)], dim=2)
        if layers[0].k_buf.data_ptr() != known[0]:  # new buffers (grown, or ended rows dropped)
            shape = layers[0].k_buf.shape
            if any(x.shape != shape or not x.is_contiguous() for layer in layers for x in (layer.k_buf, layer.v_buf)):
                return fallback(ids, positions, mask)
            for entry, layer in zip(table, layers, strict=True):
                entry.k_buf, entry.v_buf = layer.k_buf.data_ptr(), layer.v_buf.data_ptr()
            known[0] = layers[0].k_buf.data_ptr()
        capacity = layers[0].k_buf.shape[2]
        ids = ids.reshape(rows).contiguous()
        if int(ids.min()) < 0 or int(ids.max()) >= embed.shape[0]:  # C does not check: torch's embedding raises
            return fallback(ids.view(rows, 1), positions, mask)
        pos = None if positions is None else positions.to(torch.int64).contiguous()
        attend = None if mask is None else mask.reshape(rows, -1)
        if attend is not None and (attend.dtype != torch.bool or attend.shape[1] < length + 1):
            return fallback(ids.view(rows, 1), positions, mask)
        if attend is not None and attend.stride(1) != 1:
            attend = attend.contiguous()
        logits = torch.empty(rows, head[0].shape[0])
        read_b()
        rc = lib.native_step(
            ids.data_ptr(), rows, embed.data_ptr(), hidden, len(blocks), table, heads, kv_heads, d, inter, eps,
            float(inner.layers[0].self_attn.scaling), rotary.inv_freq.data_ptr(), float(rotary.attention_scaling),
            None if pos is None else pos.data_ptr(), length, capacity,
            None if attend is None else attend.data_ptr(), 0 if attend is None else attend.stride(0),
            inner.norm.weight.data_ptr(), head_packed.data_ptr(), head[1].data_ptr(), head[0].shape[0],
            logits.data_ptr(), table_loras, len(loras), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"native decoding step failed ({rc})")
        for layer in layers:
            layer.length = length + 1
            layer.keys, layer.values = layer.k_buf[:, :, : length + 1], layer.v_buf[:, :, : length + 1]
        return logits

    return step
