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
"""

from __future__ import annotations

import types
from typing import cast

import torch
from torch import nn


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


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for ``x`` (..., in) in any float dtype, computed in ``scale``'s dtype."""
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(scale.dtype), weight, scale)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, scale = cast(torch.Tensor, self.int8_weight), cast(torch.Tensor, self.int8_scale)  # buffers
    return int8_matmul(x, weight, scale, self.bias)
