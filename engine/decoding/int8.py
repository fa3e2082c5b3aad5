"""Weight-only int8 linear layers: a CPU decoding speed-up for the generation worker (``weights: int8``).

Decoding a small batch reads every weight once per token, so on a CPU it is bound by memory traffic, not
arithmetic. Each ``nn.Linear`` keeps an int8 copy of its weight, symmetric per output channel
(``W ~= q * s``, ``q = round(W / s)`` in [-127, 127], ``s = max|W_row| / 127``), and its forward becomes
``torch._weight_int8pack_mm(x, q, s)``: a quarter of float32's bytes, a half of bfloat16's. The product is
computed in bfloat16 (the kernel's fast path on the CPU) and cast back to the activations' dtype: float32
activations around it measured a little faster than a bfloat16 model (CPU attention in bfloat16 is slow).
The original weight stays (PEFT's adapter layers, DoRA's norm and merging read it), so this trades memory for
speed. The outputs are close to, not equal to, full precision: the worker's default stays ``weights: full``.

Projections that read the same input (attention's q/k/v, a SwiGLU MLP's gate/up) also get one stacked int8
weight on their parent (:data:`GROUPS`), and each projection's own int8 weight becomes a view of its rows: one
matmul instead of three (or two) in the decode loop's fast path (:mod:`engine.decoding.decode`), no extra memory.

One row at a time (one answer decoding), :func:`compile_row_products` replaces the kernel with a product compiled
by inductor, ``torch.compile``'s code generator (its CPU code: each weight converted to float32 in registers and
multiplied by the float32 input, one pass over the int8 bytes), one compiled function per weight shape, called
directly: measured 2x faster than ``torch._weight_int8pack_mm`` for the 49k-token head and 1.3x over a whole
model's products (``benchmarks/decode_bench.py``). It is slower than the kernel for 4 rows and more, which keep
the kernel. Its numbers are the dequantised int8 weight times the float32 input (the kernel rounds the input to
bfloat16), so they differ from the kernel's by about bfloat16's rounding.

Where the CPU has AVX-512 VNNI and a C compiler is there, both give way to the int8 x int16 products of
:mod:`engine.decoding.int8_dot` (float32 inputs, any number of rows; :func:`use_dot_products` switches them):
measured faster than either at 1, 4 and 8 rows and closer to float32 (``benchmarks/decode_bench.py``).
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from finetune_studio.engine.decoding import int8_dot


def int8_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def quantize_linears_int8(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Give every plain ``nn.Linear`` in ``model`` an int8 weight and the int8 forward; return how many."""
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # adapter layers (peft) wrap a Linear; their base layer is converted
            continue
        quantize_linear_int8(module, compute_dtype)
        count += 1
    stack_int8_groups(model)
    return count


def quantize_linear_int8(module: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Give one ``nn.Linear`` its int8 weight and the int8 forward."""
    w = module.weight.detach().float()  # (out, in)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    module.register_buffer("int8_weight", q, persistent=False)
    module.register_buffer("int8_scale", scale.to(compute_dtype), persistent=False)
    module.forward = types.MethodType(_int8_forward, module)  # type: ignore[method-assign]


def stack_int8_groups(model: nn.Module) -> None:
    """Stack the int8 projections that read one input (:data:`GROUPS`) in every module of ``model``."""
    for module in model.modules():
        for fused, names in GROUPS.items():
            _stack(module, fused, names)


GROUPS = {"int8_qkv": ("q_proj", "k_proj", "v_proj"), "int8_gate_up": ("gate_proj", "up_proj")}


def _stack(parent: nn.Module, fused: str, names: tuple[str, ...]) -> None:
    parts = [getattr(parent, n, None) for n in names]
    if not all(type(p) is nn.Linear and hasattr(p, "int8_weight") for p in parts):
        return
    linears = cast(list[nn.Linear], parts)
    if len({p.in_features for p in linears}) != 1 or len({p.bias is None for p in linears}) != 1:
        return
    weight = torch.cat([cast(torch.Tensor, p.int8_weight) for p in linears])  # (sum of out, in)
    scale = torch.cat([cast(torch.Tensor, p.int8_scale) for p in linears])
    bias = None if linears[0].bias is None else torch.cat([p.bias.detach() for p in linears])
    start = 0
    for p in linears:  # each projection's int8 weight: a view of its rows of the stack
        rows = slice(start, start + p.out_features)
        p.register_buffer("int8_weight", weight[rows], persistent=False)
        p.register_buffer("int8_scale", scale[rows], persistent=False)
        start += p.out_features
    parent.register_buffer(f"{fused}_weight", weight, persistent=False)
    parent.register_buffer(f"{fused}_scale", scale, persistent=False)
    parent.register_buffer(f"{fused}_bias", bias, persistent=False)
    setattr(parent, f"{fused}_sizes", [p.out_features for p in linears])


def stacked(parent: nn.Module, fused: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]] | None:
    """(int8 weight, scale, bias, output sizes) of ``parent``'s stacked group ``fused``, or None where its
    projections are not (or no longer) plain int8 linears (PEFT wraps them once an adapter is attached)."""
    if not hasattr(parent, f"{fused}_weight"):
        return None
    if not all(type(getattr(parent, n, None)) is nn.Linear for n in GROUPS[fused]):
        return None
    return (
        getattr(parent, f"{fused}_weight"),
        getattr(parent, f"{fused}_scale"),
        getattr(parent, f"{fused}_bias"),
        getattr(parent, f"{fused}_sizes"),
    )


log = logging.getLogger(__name__)

RowProduct = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_row_products: dict[tuple[int, int], RowProduct] = {}  # (out, in) -> compiled one-row product; empty: none


def row_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale).T`` for one float32 row ``x`` (1, in), in float32: what :func:`compile_row_products`
    compiles (called as it is, eagerly, it materialises the float32 weight: the reference for tests)."""
    return ((weight.to(torch.float32) * x).sum(-1) * scale.to(torch.float32)).unsqueeze(0)


def _compiled_row_product(out_features: int, in_features: int) -> RowProduct:
    """Inductor's code for :func:`row_product` at one shape (contiguous float32 input, int8 weight, bfloat16
    scale), called directly: without ``torch.compile``'s frame and guard machinery (22 us a call against 7 measured,
    121 calls a step), so the caller must pass exactly those dtypes, shapes and contiguous layouts."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    example = (
        torch.zeros(1, in_features),
        torch.zeros(out_features, in_features, dtype=torch.int8),
        torch.ones(out_features, dtype=torch.bfloat16),
    )
    compiled = cast(Callable[..., object], compile_fx(make_fx(row_product)(*example), list(example)))

    def product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = compiled(x, weight, scale)
        return cast(torch.Tensor, out[0] if isinstance(out, (list, tuple)) else out)

    return product


def compile_row_products(model: nn.Module) -> float:
    """Compile the one-row product for every int8 weight shape of ``model`` (its plain linears and stacks) and use
    it from then on for single-row float32 inputs; return the seconds it took. Where compiling fails (no C++
    compiler on this machine), say so in the log, keep the kernel and return -1. Where the int8 x int16 products
    (:mod:`engine.decoding.int8_dot`) are on and run here, they take every row: nothing to compile, returns 0."""
    if _dot_products_on and int8_dot.available():
        return 0.0
    shapes = sorted(
        {
            tuple(t.shape)
            for m in model.modules()
            for name, t in m.named_buffers(recurse=False)
            if name.startswith("int8_") and name.endswith("weight") and t.dim() == 2
        }
    )
    start = time.perf_counter()
    try:
        for out_f, in_f in shapes:
            key = (int(out_f), int(in_f))
            if key in _row_products:
                continue
            fn = _compiled_row_product(*key)
            weight = torch.zeros(key, dtype=torch.int8)
            with torch.inference_mode():
                fn(torch.zeros(1, key[1]), weight, torch.ones(key[0], dtype=torch.bfloat16))
            _row_products[key] = fn
    except Exception as exc:  # inductor needs a C++ compiler; the kernel works without one
        log.warning("int8: the compiled one-row product is not available (%s: %s)", type(exc).__name__, exc)
        return -1.0
    return time.perf_counter() - start


def use_row_products(on: bool) -> bool:
    """Switch the compiled one-row products on (those compiled so far) or off (the kernel for every input);
    return whether they were on."""
    global _row_products_on
    was, _row_products_on = _row_products_on, on
    return was


_row_products_on = True


def use_dot_products(on: bool) -> bool:
    """Switch the int8 x int16 products (:mod:`engine.decoding.int8_dot`, float32 inputs where the CPU has AVX-512
    VNNI) on or off (then the compiled one-row products and torch's kernel); return whether they were on."""
    global _dot_products_on
    was, _dot_products_on = _dot_products_on, on
    return was


_dot_products_on = True


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for ``x`` (..., in) in any float dtype, computed in ``scale``'s dtype
    (one float32 row: in float32, where :func:`compile_row_products` compiled this shape)."""
    shape = x.shape
    if _dot_products_on and x.dtype == torch.float32 and weight.dtype == torch.int8 and scale.dtype == torch.bfloat16:
        if weight.is_contiguous() and scale.is_contiguous() and x.device.type == "cpu" and int8_dot.available():
            b = None if bias is None else bias.to(torch.float32).contiguous()
            y = int8_dot.int8_dot_matmul(x.reshape(-1, shape[-1]), weight, scale, b)
            return y.reshape(*shape[:-1], y.shape[-1])
    if _row_products_on and x.dtype == torch.float32 and x.numel() == shape[-1]:
        product = _row_products.get((weight.shape[0], weight.shape[1]))
        usable = weight.dtype == torch.int8 and scale.dtype == torch.bfloat16
        if product is not None and usable and weight.is_contiguous() and scale.is_contiguous():
            y = product(x.reshape(1, -1).contiguous(), weight, scale)
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.reshape(*shape[:-1], y.shape[-1])
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(scale.dtype), weight, scale)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, scale = cast(torch.Tensor, self.int8_weight), cast(torch.Tensor, self.int8_scale)  # buffers
    return int8_matmul(x, weight, scale, self.bias)
