"""Grouped-query attention without repeating keys and values.

With a padding mask, transformers' SDPA path repeats each key/value head ``heads / kv_heads`` times (``repeat_kv``)
before calling ``torch.nn.functional.scaled_dot_product_attention`` (it passes ``enable_gqa`` only without a mask),
and the attention's backward keeps the repeated copies: keys and values at the query width. Torch's CPU kernel
takes ``enable_gqa`` with a mask too, and then keeps them at their own width (and runs a little faster).

Packed rows (``packed_attention``): one causal SDPA call per sequence of the row.

Layering: reference (``gqa_attention_reference``: repeat, then SDPA, as transformers does) -> public op
(``gqa_attention`` with ``impl='auto'|'torch'|'reference'``: torch's SDPA with ``enable_gqa``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gqa_attention_reference(q, k, v, mask=None, *, scale=None, dropout=0.0, is_causal=False) -> torch.Tensor:
    """q [B, H, T, D], k / v [B, KV, S, D] with H a multiple of KV -> [B, H, T, D]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal)


def gqa_attention(q, k, v, mask=None, *, scale=None, dropout=0.0, is_causal=False, impl: str = "auto"):
    """Public op: attention of q's heads over k / v's (fewer) heads, each shared by ``H / KV`` query heads."""
    if impl == "reference":
        return gqa_attention_reference(q, k, v, mask, scale=scale, dropout=dropout, is_causal=is_causal)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not share {k.shape[1]} key/value heads evenly")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal, enable_gqa=True
    )


def packed_attention(q, k, v, lengths: list[int], *, scale=None, dropout=0.0) -> torch.Tensor:
    """Causal attention within each sequence of a packed row: q [1, H, T, D], k / v [1, KV, T, D], ``lengths`` the
    sequences' token counts (summing to T) -> [1, H, T, D]. Each sequence is its own SDPA call (causal, grouped
    key/value heads as they are), so no work or mask spans two sequences: the same numbers as a block-diagonal
    causal mask over the whole row."""
    if q.shape[0] != 1 or sum(lengths) != q.shape[2]:
        raise ValueError(f"a packed row [1, H, {sum(lengths)}, D] was expected, not {list(q.shape)}")
    if len(lengths) == 1:
        return gqa_attention(q, k, v, scale=scale, dropout=dropout, is_causal=True)
    outs = [
        gqa_attention(qs, ks, vs, scale=scale, dropout=dropout, is_causal=True)
        for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
    ]
    return torch.cat(outs, dim=2)
