"""A census of the tensors autograd saves for backward, by module and by op.

``with SavedTensorCensus(model) as census: loss = forward(...)`` records, for every tensor saved for backward
(``torch.autograd.graph.saved_tensors_hooks``), the innermost module running (its class name) and the Python-level
torch function that saved it (``F.linear``, ``Tensor.mul``, ``scaled_dot_product_attention``, an autograd Function's
name...). Each storage counts once (a view shares its base's storage), parameters and buffers not at all, and only
if the graph still holds it when the forward ends (``alive_bytes``). Used by ``benchmarks/saved_tensors.py`` and the
memory tests; nothing in training depends on it.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode


class _Box:  # autograd holds the box: a dead box means the graph dropped the tensor
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class _OpMode(TorchFunctionMode):
    """Names the outermost torch function running (the one a saved tensor belongs to)."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
        if name == "apply" and args:  # autograd.Function.apply: name the Function
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        self.stack.append(name)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.stack.pop()


@dataclass
class _Entry:
    module: str
    op: str
    nbytes: int
    refs: list = field(default_factory=list)

    def alive(self) -> bool:
        return any(r() is not None for r in self.refs)


class SavedTensorCensus:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.entries: dict[int, _Entry] = {}
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self._modules: list[str] = ["(outside)"]
        self._mode = _OpMode()
        self._hooks: list = []
        self._saved: torch.autograd.graph.saved_tensors_hooks | None = None

    def _enter(self, name: str) -> None:
        self._modules.append(name)

    def _leave(self) -> None:  # a forward hook's return value would replace the module's output
        self._modules.pop()

    def _pack(self, t: torch.Tensor):
        box = _Box(t)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip or not storage.nbytes():
            return box
        entry = self.entries.get(ptr)
        if entry is None or not entry.alive():  # new, or a freed address reused
            op = self._mode.stack[0] if self._mode.stack else "autograd.Function"
            entry = self.entries[ptr] = _Entry(self._modules[-1], op, storage.nbytes())
        entry.refs.append(weakref.ref(box))
        return box

    def __enter__(self) -> SavedTensorCensus:
        for module in self.model.modules():
            name = type(module).__name__
            self._hooks.append(module.register_forward_pre_hook(lambda *_a, n=name: self._enter(n)))
            self._hooks.append(module.register_forward_hook(lambda *_a: self._leave()))
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.t)
        self._saved.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        assert self._saved is not None
        self._saved.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def alive_bytes(self) -> int:
        """Bytes saved for backward and still held by the graph (call before backward)."""
        return sum(e.nbytes for e in self.entries.values() if e.alive())

    def breakdown(self) -> list[tuple[str, str, int, int]]:
        """(module class, op, bytes, tensors) of the alive saved tensors, largest first."""
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for e in self.entries.values():
            if e.alive():
                s = sums[(e.module, e.op)]
                s[0] += e.nbytes
                s[1] += 1
        return sorted(((m, o, b, n) for (m, o), (b, n) in sums.items()), key=lambda r: -r[2])
