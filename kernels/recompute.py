"""Recompute a cheap tensor in backward instead of keeping it, when a later op saves it.

An elementwise op's output is often saved by the op that consumes it: Llama's RMSNorm output by the LoRA ``A``
projections of q/k/v (their weight gradient needs the input), SwiGLU's output by ``down_proj``'s. The op that made
it keeps its own inputs anyway, so the output can be rebuilt from them in backward for a few elementwise operations,
and not kept: ``with recompute_when_saved(out, rebuild): consumer(out)``.

Inside the block, a saved-tensors pack hook checks whether each tensor autograd saves lives in ``out``'s storage (the
tensor itself or a view of it, such as the [B*T, H] view a linear layer saves for a [B, T, H] input) and stores a
handle and the view's geometry instead; the unpack hook calls ``rebuild()`` (once, shared by every consumer that
saved it, dropped after the last one's backward) and takes the same view of the result. ``out`` must be contiguous
and own its storage (a fresh op output). Every other
tensor goes to the hooks that were active outside the block (another ``recompute_when_saved``, a census, ...), or is
kept as usual. Without the (private) hook-stack accessor of torch, or with gradients off, the block does nothing.
Do not use it inside a gradient-checkpointed region: the checkpoint's own hooks must see every saved tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class _Rebuilt:
    """Shared by the saved slots that hold the recomputed tensor."""

    __slots__ = ("rebuild", "uses", "value")

    def __init__(self, rebuild: Callable[[], torch.Tensor]):
        self.rebuild = rebuild
        self.uses = 0
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        value = self.value if self.value is not None else self.rebuild()
        self.uses -= 1
        self.value = value if self.uses > 0 else None
        return value


def _owns_storage(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def available() -> bool:
    return hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")


@contextlib.contextmanager
def recompute_when_saved(out: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Within the block, autograd saves a handle to ``rebuild`` instead of ``out`` itself (see the module doc).
    ``rebuild()`` must return ``out``'s values (same shape, dtype and device) without a graph."""
    if not (torch.is_grad_enabled() and out.requires_grad and available() and _owns_storage(out)):
        yield
        return
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    ptr, dtype, device = out.untyped_storage().data_ptr(), out.dtype, out.device

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.device == device and t.untyped_storage().data_ptr() == ptr:
            handle.uses += 1
            return (handle, tuple(t.shape), t.stride(), t.storage_offset())
        return (outer[0](t),) if outer is not None else (t,)

    def unpack(packed):
        if packed[0] is handle:
            _, size, stride, offset = packed
            return handle.get().as_strided(size, stride, offset)
        return outer[1](packed[0]) if outer is not None else packed[0]

    handle = _Rebuilt(rebuild)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
