"""Rotary position embedding of q and k in one pass each way over float32 CPU tensors (AVX-512).

The rotation Llama-family models apply (the ``rotate_half`` convention: the two halves of the head dimension are a
pair, not neighbouring elements as in GPT-J)::

    rotate_half(x) = cat(-x2, x1)            (x1, x2: the first and second half of the last dimension)
    out = x * cos + rotate_half(x) * sin     for x = q and x = k, cos and sin broadcast over the heads

torch runs it as about seven ops per tensor forward (two slices, a negation, a concatenation, two products, a sum)
and as many backward, each a trip through memory. ``rotary_native`` reads q and k once and writes both outputs, in
one call; its backward rotates the gradients back (the rotation is orthogonal per pair: the transpose is the
rotation by the opposite angle)::

    out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2                       (forward)
    dx1  = g1 c1 + g2 s2,   dx2  = g2 c2 - g1 s1                        (backward)

Each product and each sum is rounded once, as torch's separate ops round them (the kernel uses the intrinsics with
an explicit rounding mode, which the compiler does not fuse into multiply-adds), so the outputs and the gradients
are torch's bit for bit, and ``cos``/``sin`` are read whole (their halves need not be equal). cos and sin take no
gradient.

Layouts: q and k 4-D with a unit stride on the last dimension (any other strides: a transposed ``[B, T, H, D]``
projection, a slice of a stacked q/k/v product), cos and sin ``[B or 1, T, D]`` unsqueezed at ``unsqueeze_dim``
and broadcast to q's and k's shapes (H and the number of key/value heads may differ). The outputs are new tensors
in the memory order of their inputs (a ``[B, T, H, D]`` buffer for the usual transposed projection, as torch's
ops give), and so are the gradients (so that the transpose and the view of the projection take them back without
a copy). Anything else (other dtypes or devices, cos/sin that need a gradient, a trace or compile, a last-dimension
stride other than 1) runs the torch ops (``rotary_reference``). ``NATIVE = False`` runs them always.

C compiled once and loaded with ctypes (``kernels.native_build``), rows split over torch's thread count;
:func:`available` is False where the CPU lacks AVX-512 or nothing compiles.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from finetune_studio.kernels import native_build

log = logging.getLogger(__name__)

NATIVE = True  # float32 CPU tensors through the C kernel where it runs

# The rotation of one row of a head, pasted into this module's source and ``kernels.grouped_qkv_rotary``'s after their
# ``#include <immintrin.h>``, ``#define AVX512 __attribute__((target("avx512f")))`` and ``#define RN ...``.
ROTATE_ROW = r"""
/* 16 pairs (x1, x2) of a row rotated by the angle (inverse: by its opposite); each product and sum rounded once
   (the _round_ intrinsics: no contraction into a multiply-add), as torch's separate ops */
AVX512 static inline __attribute__((always_inline)) void rotate_pair(__m512 x1, __m512 x2, __m512 c1, __m512 c2,
                                                                     __m512 s1, __m512 s2, int inverse, __m512* y1,
                                                                     __m512* y2) {
  if (!inverse) {
    *y1 = _mm512_sub_round_ps(_mm512_mul_round_ps(x1, c1, RN), _mm512_mul_round_ps(x2, s1, RN), RN);
    *y2 = _mm512_add_round_ps(_mm512_mul_round_ps(x2, c2, RN), _mm512_mul_round_ps(x1, s2, RN), RN);
  } else {
    *y1 = _mm512_add_round_ps(_mm512_mul_round_ps(x1, c1, RN), _mm512_mul_round_ps(x2, s2, RN), RN);
    *y2 = _mm512_sub_round_ps(_mm512_mul_round_ps(x2, c2, RN), _mm512_mul_round_ps(x1, s1, RN), RN);
  }
}

/* one row of half * 2 floats rotated (y may be x: each block is read before it is written) */
AVX512 static inline void rotate_row(const float* x, const float* c, const float* s, float* y, int64_t half,
                                     int inverse) {
  for (int64_t i = 0; i < half; i += 16) {
    int64_t left = half - i;
    __mmask16 k = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 x1 = _mm512_maskz_loadu_ps(k, x + i), x2 = _mm512_maskz_loadu_ps(k, x + half + i);
    __m512 c1 = _mm512_maskz_loadu_ps(k, c + i), c2 = _mm512_maskz_loadu_ps(k, c + half + i);
    __m512 s1 = _mm512_maskz_loadu_ps(k, s + i), s2 = _mm512_maskz_loadu_ps(k, s + half + i);
    __m512 y1, y2;
    rotate_pair(x1, x2, c1, c2, s1, s2, inverse, &y1, &y2);
    _mm512_mask_storeu_ps(y + i, k, y1);
    _mm512_mask_storeu_ps(y + half + i, k, y2);
  }
}
"""

SOURCE = (
    r"""
#include <immintrin.h>
#include <stdint.h>
#define AVX512 __attribute__((target("avx512f")))
#define RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

int cpu_rotary_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

"""
    + ROTATE_ROW
    + r"""
/* one tensor: ptrs x, cos, sin, out; meta B, H, T, then the (b, h, t) strides in floats of x, cos, sin and out
   (12). (b, t) split over the threads, the heads within */
AVX512 static void rotate_tensor(const float* const* ptrs, const int64_t* m, int64_t half, int inverse,
                                 int threads) {
  int64_t heads = m[1], steps = m[2], rows = m[0] * steps;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t bt = 0; bt < rows; bt++) {
    int64_t b = bt / steps, t = bt % steps;
    const float* x = ptrs[0] + b * m[3] + t * m[5];
    const float* c = ptrs[1] + b * m[6] + t * m[8];
    const float* s = ptrs[2] + b * m[9] + t * m[11];
    float* y = (float*)ptrs[3] + b * m[12] + t * m[14];
    for (int64_t h = 0; h < heads; h++)
      rotate_row(x + h * m[4], c + h * m[7], s + h * m[10], y + h * m[13], half, inverse);
  }
}

/* q and k in one call: ptrs 8 (q's x, cos, sin, out, then k's), meta 30 (q's 15, then k's) */
AVX512 void rotary(const float* const* ptrs, const int64_t* meta, int64_t half, int inverse, int threads) {
  rotate_tensor(ptrs, meta, half, inverse, threads);
  rotate_tensor(ptrs + 4, meta + 15, half, inverse, threads);
}
"""
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load("cpu_rotary", SOURCE)
    if lib is None:
        return None
    if not lib.cpu_rotary_supported():
        log.info("cpu_rotary: this CPU lacks AVX-512; the rotary embedding stays torch's ops")
        return None
    pointer = ctypes.c_void_p
    lib.rotary.argtypes = [pointer, pointer, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.rotary.restype = None
    return lib


def available() -> bool:
    """Whether the native rotary embedding runs here (builds it on the first call: about a second)."""
    return _library() is not None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dimension's halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference (torch's ops): ``x * cos + rotate_half(x) * sin`` for q and for k, cos and sin unsqueezed at
    ``unsqueeze_dim`` (the heads' dimension)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _broadcast(t: torch.Tensor, unsqueeze_dim: int, shape: torch.Size) -> torch.Tensor | None:
    """cos or sin unsqueezed and expanded to ``shape`` (strides 0 where broadcast); None where it does not fit."""
    n = t.dim() + 1
    if len(shape) != n or not -n <= unsqueeze_dim < n:
        return None
    dims = list(t.shape)
    dims.insert(unsqueeze_dim % n, 1)
    if any(a != b and a != 1 for a, b in zip(dims, shape)):
        return None
    return t.unsqueeze(unsqueeze_dim).expand(shape)


def runs_on(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> bool:
    """Whether :func:`apply_rotary` takes these through the kernel: ``NATIVE`` on, the kernel built, float32 CPU
    tensors, q and k 4-D with one even head dimension and a unit last stride, cos and sin of one shape that broadcasts
    to both after the unsqueeze (no gradient for them where autograd records), outside a trace or compile."""
    tensors = (q, k, cos, sin)
    if not NATIVE or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    d = q.shape[-1] if q.dim() == 4 else 0
    if d == 0 or d % 2 or k.dim() != 4 or k.shape[-1] != d or cos.shape != sin.shape or cos.shape[-1:] != (d,):
        return False
    if any(t.stride(-1) != 1 for t in tensors) or q.numel() == 0 or k.numel() == 0:
        return False
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    fits = all(_broadcast(t, unsqueeze_dim, x.shape) is not None for t in (cos, sin) for x in (q, k))
    return fits and available()


def _order(t: torch.Tensor) -> list[int]:
    """``t``'s dimensions from the outermost in memory to the innermost: dimensions of size 1 first, then by stride,
    larger first (ties: in order)."""
    strides = t.stride()
    return sorted(range(t.dim()), key=lambda i: (t.shape[i] != 1, -strides[i], i))


def _empty_in_order(shape: torch.Size, order: list[int], like: torch.Tensor) -> torch.Tensor:
    """A new dense tensor of ``shape`` whose dimensions lie in memory in ``order`` (outermost first)."""
    out = torch.empty([shape[i] for i in order], dtype=like.dtype, device=like.device)
    return out.permute([order.index(i) for i in range(len(order))])


def _meta(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> list[int]:
    return [*x.shape[:3], *x.stride()[:3], *c.stride()[:3], *s.stride()[:3], *y.stride()[:3]]


def _run(
    xs: tuple[torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int,
    orders: tuple[list[int], list[int]],
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _library()
    if lib is None:
        raise RuntimeError("cpu_rotary: the kernel is not available here (check available() first)")
    outs, ptrs, meta, inputs = [], [], [], []
    for x, order in zip(xs, orders):
        if x.stride(-1) != 1:  # an expanded gradient (of a sum): a copy, alive until the call below
            x = x.contiguous()
        inputs.append(x)
        c, s = _broadcast(cos, unsqueeze_dim, x.shape), _broadcast(sin, unsqueeze_dim, x.shape)
        if c is None or s is None:
            raise ValueError(f"cpu_rotary: cos {list(cos.shape)} does not broadcast to {list(x.shape)}")
        y = _empty_in_order(x.shape, order, x)
        outs.append(y)
        ptrs += [x.data_ptr(), c.data_ptr(), s.data_ptr(), y.data_ptr()]
        meta += _meta(x, c, s, y)
    p = (ctypes.c_void_p * 8)(*ptrs)
    m = (ctypes.c_int64 * 30)(*meta)
    lib.rotary(p, m, xs[0].shape[-1] // 2, int(inverse), torch.get_num_threads())
    del inputs
    return outs[0], outs[1]


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        orders = (_order(q), _order(k))
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.orders = unsqueeze_dim, orders
        out_q, out_k = _run((q, k), cos, sin, unsqueeze_dim, orders, inverse=False)
        for out, grad in zip((out_q, out_k), ctx.needs_input_grad[:2]):
            if not grad:  # as torch's ops: no gradient for the rotation of a tensor that has none
                ctx.mark_non_differentiable(out)
        return out_q, out_k

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        d_q, d_k = _run((grad_q, grad_k), cos, sin, ctx.unsqueeze_dim, ctx.orders, inverse=True)
        return (
            d_q if ctx.needs_input_grad[0] else None,
            d_k if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


def rotary_native(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated (q, k) through the kernel, with autograd (check :func:`runs_on` first)."""
    out: tuple[torch.Tensor, torch.Tensor] = _Rotary.apply(q, k, cos, sin, unsqueeze_dim)
    return out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public op: the rotary embedding of q and k. ``impl``: 'auto' (the kernel where :func:`runs_on`, else the
    torch ops) or 'reference' (the torch ops). Both give the same numbers."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"unknown impl {impl!r}")
    if impl == "auto" and runs_on(q, k, cos, sin, unsqueeze_dim):
        return rotary_native(q, k, cos, sin, unsqueeze_dim)
    return rotary_reference(q, k, cos, sin, unsqueeze_dim)
