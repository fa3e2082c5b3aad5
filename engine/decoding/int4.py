"""Weight-only int4 linear layers: the generation worker's ``weights: int4`` (CPU decoding, half of int8's bytes).

Each ``nn.Linear`` whose shape the kernel takes keeps a packed int4 copy of its weight, group-wise asymmetric
along the input features: each run of ``group_size`` weights of a row gets a scale ``s = (max - min) / 15`` and
a zero point, ``W ~= (q - 8) * s + z`` with ``q = round((W - min) / s)`` in [0, 15] and ``z = min + 8 s`` (the
layout of ``torch._weight_int4pack_mm_for_cpu``: scales and zeros as one ``(in / group, out, 2)`` bfloat16
tensor). torch's kernel computes the product in bfloat16, cast back to the activations' dtype (below: float32
inputs take integer products where the CPU allows).

The kernel needs ``in_features`` to be a multiple of the group size and ``out_features`` a multiple of 16; other
layers fall back to int8 (:func:`int4_fits` says which). The vocabulary head stays int8 by default
(``head="int8"``): see ``benchmarks/quant_quality.py`` for what int4 costs there. As with int8, the original
weight stays (PEFT adapter layers read it) and the outputs are close to, not equal to, full precision.

Projections reading one input (q/k/v, gate/up) also get one stacked int4 weight on their parent
(:data:`GROUPS`): one matmul in the decode loop's fast path (:mod:`engine.decoding.decode`). The CPU packing is blocked
by rows, so each projection's weight is a view of its rows of the stack where the packing allows it (checked),
a copy of its own otherwise.

Where the CPU has AVX-512 VNNI and a C compiler is there, float32 inputs take llama.cpp's q4_0 x q8_0 scheme
instead (:mod:`engine.decoding.int4_dot`: each activation row quantised to int8 in blocks of 32, ``vpdpbusd`` on
the codes; each int4 weight and stack gets the kernel's packed copy when quantised, 5 bits a weight beside
torch's packing; :func:`use_dot_products` switches them): a model's block products at one row 3.6 ms against
the packed int8 x int16 kernel's 5.5 (C timing loop), and a plain int4 Llama-family model runs each step in C
(:mod:`engine.decoding.native_step`). The int8 activations cost a little: KL against float32 0.0341 against
torch's kernel's 0.0317 (top-1 90.1% against 90.9%; llama.cpp's q4_0 0.43 / 70.6%), ``benchmarks/decode_bench.py``.
"""

from __future__ import annotations

import types
from typing import cast

import torch
from torch import nn

from finetune_studio.engine.decoding import int4_dot
from finetune_studio.engine.decoding.int8 import quantize_linear_int8, stack_int8_groups

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # measured: benchmarks/quant_quality.py (RESULTS.md, "Generation worker speed")
GROUPS = {"int4_qkv": ("q_proj", "k_proj", "v_proj"), "int4_gate_up": ("gate_proj", "up_proj")}


def int4_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether the CPU int4 kernel takes an ``(out_features, in_features)`` weight with ``group_size``."""
    return in_features % group_size == 0 and out_features % 16 == 0


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) -> (codes (out, in) int32 in [0, 15], scales and zeros (in / group, out, 2) float32)."""
    out_f, in_f = weight.shape
    if not int4_fits(in_f, out_f, group_size):
        raise ValueError(f"int4: a ({out_f}, {in_f}) weight does not fit groups of {group_size} (see int4_fits)")
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    codes = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    zero = low + 8 * scale
    scales_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return codes, scales_zeros


def dequantize_int4(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight (out, in) that ``codes`` and ``scales_zeros`` stand for (for tests and measurements)."""
    out_f, in_f = codes.shape
    sz = scales_zeros.float().transpose(0, 1)  # (out, groups, 2)
    q = codes.float().reshape(out_f, in_f // group_size, group_size)
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(out_f, in_f)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


def quantize_linears_int4(
    model: nn.Module,
    group_size: int = DEFAULT_GROUP_SIZE,
    head: str = "int8",
    compute_dtype: torch.dtype = torch.bfloat16,
) -> tuple[int, int]:
    """Give every plain ``nn.Linear`` of ``model`` the int4 weight and forward (int8 where int4 does not fit, and
    for the output head unless ``head="int4"``); return (int4 layers, int8 layers)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4: group size must be one of {GROUP_SIZES}, not {group_size}")
    if head not in ("int4", "int8"):
        raise ValueError(f"int4: head must be 'int4' or 'int8', not {head!r}")
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    four = eight = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # adapter layers (peft) wrap a Linear; their base layer is converted
            continue
        if (module is output and head == "int8") or not int4_fits(module.in_features, module.out_features, group_size):
            quantize_linear_int8(module, compute_dtype)
            eight += 1
            continue
        codes, scales_zeros = quantize_int4(module.weight, group_size)
        module.register_buffer("int4_codes", codes, persistent=False)  # kept for stacking, dropped after
        module.register_buffer("int4_weight", pack_int4(codes), persistent=False)
        module.register_buffer("int4_scales_zeros", scales_zeros.to(compute_dtype), persistent=False)
        setattr(module, "int4_group_size", group_size)  # noqa: B010 (an attribute, not a submodule)
        module.forward = types.MethodType(_int4_forward, module)  # type: ignore[method-assign]
        four += 1
    for module in model.modules():
        for fused, names in GROUPS.items():
            _stack(module, fused, names)
    if int4_dot.available():
        _pack_for_dot_products(model)
    for module in model.modules():
        if hasattr(module, "int4_codes"):
            del module.int4_codes
    stack_int8_groups(model)  # the int8 fallbacks' own stacks
    return four, eight


def _pack_for_dot_products(model: nn.Module) -> None:
    """:func:`int4_dot.pack` of every int4 layer's weight, and of each stack (its projections' packed copies are
    views of the stack's rows: 16 outputs a block, no copy), registered with the int4 weights they stand for."""
    done: set[int] = set()
    for parent in model.modules():
        for fused in GROUPS:
            found = stacked_int4(parent, fused)
            if found is None or not hasattr(parent, GROUPS[fused][0]):
                continue
            linears = [cast(nn.Linear, getattr(parent, n)) for n in GROUPS[fused]]
            if not all(hasattr(p, "int4_codes") for p in linears):
                continue
            codes = torch.cat([cast(torch.Tensor, p.int4_codes) for p in linears])
            stack = int4_dot.pack(codes, found[1], found[2])
            int4_dot.register(found[0], stack)
            start = 0
            for p in linears:
                own = stack[start // 16 : (start + p.out_features) // 16]
                int4_dot.register(cast(torch.Tensor, p.int4_weight), own)
                done.add(id(p))
                start += p.out_features
    for module in model.modules():
        if hasattr(module, "int4_codes") and id(module) not in done:
            packed = int4_dot.pack(
                cast(torch.Tensor, module.int4_codes),
                cast(torch.Tensor, module.int4_scales_zeros),
                int(getattr(module, "int4_group_size")),  # noqa: B009
            )
            int4_dot.register(cast(torch.Tensor, module.int4_weight), packed)


def use_dot_products(on: bool) -> bool:
    """Switch the q4_0 x q8_0 products (:mod:`engine.decoding.int4_dot`, float32 inputs where the CPU has AVX-512
    VNNI) on or off (then torch's int4 kernel in bfloat16); return whether they were on."""
    global _dot_products_on
    was, _dot_products_on = _dot_products_on, on
    return was


_dot_products_on = True


def _stack(parent: nn.Module, fused: str, names: tuple[str, ...]) -> None:
    parts = [getattr(parent, n, None) for n in names]
    if not all(type(p) is nn.Linear and hasattr(p, "int4_weight") for p in parts):
        return
    linears = cast(list[nn.Linear], parts)
    if len({p.in_features for p in linears}) != 1 or len({p.bias is None for p in linears}) != 1:
        return
    if len({p.int4_group_size for p in linears}) != 1:
        return
    weight = pack_int4(torch.cat([cast(torch.Tensor, p.int4_codes) for p in linears]))
    scales_zeros = torch.cat([cast(torch.Tensor, p.int4_scales_zeros) for p in linears], dim=1)
    bias = None if linears[0].bias is None else torch.cat([p.bias.detach() for p in linears])
    start = 0
    for p in linears:  # a view of the stack's rows where the packing of those rows is the projection's own
        rows = slice(start, start + p.out_features)
        if torch.equal(weight[rows], cast(torch.Tensor, p.int4_weight)):
            p.register_buffer("int4_weight", weight[rows], persistent=False)
        start += p.out_features
    parent.register_buffer(f"{fused}_weight", weight, persistent=False)
    parent.register_buffer(f"{fused}_scales_zeros", scales_zeros, persistent=False)
    parent.register_buffer(f"{fused}_bias", bias, persistent=False)
    setattr(parent, f"{fused}_sizes", [p.out_features for p in linears])
    setattr(parent, f"{fused}_group_size", linears[0].int4_group_size)


def stacked_int4(
    parent: nn.Module, fused: str
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, list[int]] | None:
    """(packed weight, scales and zeros, group size, bias, output sizes) of ``parent``'s stacked int4 group, or
    None where its projections are not (or no longer) plain int4 linears."""
    if not hasattr(parent, f"{fused}_weight"):
        return None
    if not all(type(getattr(parent, n, None)) is nn.Linear for n in GROUPS[fused]):
        return None
    return (
        getattr(parent, f"{fused}_weight"),
        getattr(parent, f"{fused}_scales_zeros"),
        getattr(parent, f"{fused}_group_size"),
        getattr(parent, f"{fused}_bias"),
        getattr(parent, f"{fused}_sizes"),
    )


def int4_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the packed int4 ``W``, ``x`` (..., in) in any float dtype, computed in bfloat16; float32
    ``x`` through :mod:`engine.decoding.int4_dot` where it has ``W``'s packed copy (:func:`use_dot_products`)."""
    shape = x.shape
    if _dot_products_on and x.dtype == torch.float32 and x.device.type == "cpu":
        packed = int4_dot.packed_for(weight)
        if packed is not None:
            b = None if bias is None else bias.to(torch.float32).contiguous()
            y = int4_dot.int4_dot_matmul(x.reshape(-1, shape[-1]), packed, b)
            return y.reshape(*shape[:-1], y.shape[-1])
    flat = x.reshape(-1, shape[-1]).to(scales_zeros.dtype)
    y = torch._weight_int4pack_mm_for_cpu(flat, weight, group_size, scales_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def _int4_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, scales_zeros = cast(torch.Tensor, self.int4_weight), cast(torch.Tensor, self.int4_scales_zeros)
    return int4_matmul(x, weight, scales_zeros, int(getattr(self, "int4_group_size")), self.bias)  # noqa: B009
