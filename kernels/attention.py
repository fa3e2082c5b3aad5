"""Grouped-query attention without repeating keys and values.

With a padding mask, transformers' SDPA path repeats each key/value head ``heads / kv_heads`` times (``repeat_kv``)
before calling ``torch.nn.functional.scaled_dot_product_attention`` (it passes ``enable_gqa`` only without a mask),
and the attention's backward keeps the repeated copies: keys and values at the query width. Torch's CPU kernel
takes ``enable_gqa`` with a mask too, and then keeps them at their own width (and runs a little faster).

Packed rows (``packed_attention``): one causal SDPA call per sequence of the row.

``impl='auto'`` sends causal attention without a mask (a packed row, or ``gqa_attention``'s ``is_causal`` call) of
float32 CPU tensors without dropout through ``kernels.cpu_attention`` where it runs (one C call for the whole row,
forward and backward, about 2.3x torch's flash kernel on the bundled model's ~115-token sequences; results within
float32 rounding of SDPA's, not bit for bit); ``NATIVE = False`` keeps torch's SDPA (for comparisons).
``products=torch.bfloat16`` (bf16-mixed's attention modules, marked with :func:`set_products_dtype`) asks the kernel
for its bf16-product variant where ``cpu_attention.BF16_PRODUCTS`` is set (off by default: the loss curves' cost,
``cpu_attention``'s docstring) and the CPU has AVX512_BF16, else float32 products;
torch's SDPA, where the kernel does not run, stays float32 either way.

Layering: reference (``gqa_attention_reference``: repeat, then SDPA, as transformers does) -> public op
(``gqa_attention`` with ``impl='auto'|'torch'|'reference'``: torch's SDPA with ``enable_gqa``, or the C kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune_studio.kernels import cpu_attention

NATIVE = True  # impl='auto' sends causal float32 CPU attention without a mask or dropout through kernels.cpu_attention


_PRODUCTS = "_fs_attention_products"  # the attribute set_products_dtype gives an attention module


def is_attention_module(module: object) -> bool:
    """A transformers attention module (its class named ``...Attention``, holding the model's config): what
    ``engine.train.model_patches`` routes and marks."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "config")


def set_products_dtype(module: object, dtype: torch.dtype) -> None:
    """Mark an attention module so that its routed attention (``engine.train.model_patches.fused_ops``) asks the
    kernel for ``dtype`` products (bfloat16: bf16-mixed's attention; float32: the default)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"attention products in float32 or bfloat16, not {dtype}")
    object.__setattr__(module, _PRODUCTS, dtype)


def products_dtype(module: object) -> torch.dtype:
    """The products' dtype :func:`set_products_dtype` marked ``module`` with; float32 if unmarked."""
    dtype: torch.dtype = getattr(module, _PRODUCTS, torch.float32)
    return dtype


def _native(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> bool:
    return impl == "auto" and NATIVE and not dropout and cpu_attention.runs_on(q, k, v)


def gqa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """q [B, H, T, D], k / v [B, KV, S, D] with H a multiple of KV -> [B, H, T, D]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal)


def gqa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
    impl: str = "auto",
    products: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Public op: attention of q's heads over k / v's (fewer) heads, each shared by ``H / KV`` query heads;
    ``products``: what the C kernel multiplies in where it runs (the module's docstring)."""
    if impl == "reference":
        return gqa_attention_reference(q, k, v, mask, scale=scale, dropout=dropout, is_causal=is_causal)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not share {k.shape[1]} key/value heads evenly")
    if is_causal and mask is None and _native(impl, q, k, v, dropout):
        return cpu_attention.causal_attention_native(q, k, v, [q.shape[2]], scale, products)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal, enable_gqa=True
    )


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: list[int],
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    impl: str = "auto",
    products: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention within each sequence of a packed row: q [1, H, T, D], k / v [1, KV, T, D], ``lengths`` the
    sequences' token counts (summing to T) -> [1, H, T, D]. Each sequence is its own SDPA call (causal, grouped
    key/value heads as they are), so no work or mask spans two sequences: the same numbers as a block-diagonal
    causal mask over the whole row. ``impl='auto'``: the whole row in one call of ``kernels.cpu_attention`` where it
    runs (float32 CPU tensors, no dropout, ``NATIVE``), multiplying in ``products``; 'torch': SDPA sequence by
    sequence (the reference)."""
    if q.shape[0] != 1 or sum(lengths) != q.shape[2]:
        raise ValueError(f"a packed row [1, H, {sum(lengths)}, D] was expected, not {list(q.shape)}")
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    if _native(impl, q, k, v, dropout):
        return cpu_attention.causal_attention_native(q, k, v, lengths, scale, products)
    if len(lengths) == 1:
        return gqa_attention(q, k, v, scale=scale, dropout=dropout, is_causal=True, impl=impl)
    outs = [
        gqa_attention(qs, ks, vs, scale=scale, dropout=dropout, is_causal=True, impl=impl)
        for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
    ]
    return torch.cat(outs, dim=2)
