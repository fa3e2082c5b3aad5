"""Weight-only int8 linear layers: a CPU decoding speed-up for the generation worker (``weights: int8``).

Decoding a small batch reads every weight once per token, so on a CPU it is bound by memory traffic, not
arithmetic. Each ``nn.Linear`` keeps an int8 copy of its weight, symmetric per output channel
(``W ~= q * s``, ``q = round(W / s)`` in [-127, 127], ``s = max|W_row| / 127``), and its forward becomes
``torch._weight_int8pack_mm(x, q, s)``: a quarter of float32's bytes, a half of bfloat16's. The product is
computed in bfloat16 (the kernel's fast path on the CPU) and cast back to the activations' dtype: float32
activations around it measured a little faster than a bfloat16 model (CPU attention in bfloat16 is slow).
The original weight stays (PEFT's adapter layers, DoRA's norm and merging read it), so this trades memory for
speed. The outputs are close to, not equal to, full precision: the worker's default stays ``weights: full``.
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
        w = module.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        module.register_buffer("int8_weight", q, persistent=False)
        module.register_buffer("int8_scale", scale.to(compute_dtype), persistent=False)
        module.forward = types.MethodType(_int8_forward, module)  # type: ignore[method-assign]
        count += 1
    return count


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    weight, scale = cast(torch.Tensor, self.int8_weight), cast(torch.Tensor, self.int8_scale)  # buffers
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(scale.dtype), weight, scale)
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)
