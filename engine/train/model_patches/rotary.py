"""The rotary embedding of q and k through ``kernels.cpu_rotary`` (one C pass each way on float32 CPU tensors).

transformers' Llama-family attention forwards call their modeling module's ``apply_rotary_pos_emb(q, k, cos, sin)``
(``q * cos + rotate_half(q) * sin``, and the same for k: about seven ops each way per tensor). ``install(model)``
replaces that module attribute, for the modeling modules of ``model``'s attention layers when its architecture is
one the fused ops patch (``core.memory.estimate.FUSED_OPS_ARCHITECTURES``), with a function that calls
``kernels.cpu_rotary.rotary_native`` where the kernel takes the inputs (``cpu_rotary.runs_on``: float32 CPU
tensors of the usual layouts, ``cpu_rotary.NATIVE`` on) and transformers' own function for anything else.

A module attribute is process-wide: every model of that family in the process goes through the replacement, not
only ``model``. That is safe because the kernel gives transformers' numbers bit for bit, forward and backward (each
product and sum rounded once, as torch's ops), for every input it takes; the replacement also checks that on a
small input against the function it replaces before it is installed (a transformers version whose function
differs keeps its own). ``engine.train.model_patches.fused_ops.apply_memory_patches`` installs it (training
processes with ``fused_ops`` on); other processes (the generation worker, exports) never do. ``uninstall()`` puts
transformers' functions back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from finetune_studio.core.memory.estimate import FUSED_OPS_ARCHITECTURES
from finetune_studio.kernels import cpu_rotary

log = logging.getLogger(__name__)

NAME = "apply_rotary_pos_emb"
PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

_ORIGINALS: dict[str, RotaryFn] = {}  # modeling module name -> transformers' function it had


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _architecture(model: torch.nn.Module) -> str:
    lm = _causal_lm(model)
    archs = getattr(getattr(lm, "config", None), "architectures", None) or [""]
    return str(archs[0]) or type(lm).__name__


def _modeling_modules(model: torch.nn.Module) -> list[str]:
    """The modules that define ``model``'s attention classes and an ``apply_rotary_pos_emb`` (e.g.
    ``transformers.models.llama.modeling_llama``)."""
    names = []
    for module in _causal_lm(model).modules():
        if type(module).__name__.endswith("Attention"):
            name = type(module).__module__
            if name not in names and hasattr(sys.modules.get(name), NAME):
                names.append(name)
    return names


def replacement(original: RotaryFn) -> RotaryFn:
    """transformers' ``original`` through ``kernels.cpu_rotary`` where the kernel takes the inputs."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cpu_rotary.runs_on(q, k, cos, sin, unsqueeze_dim):
            return cpu_rotary.rotary_native(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._fs_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _same_numbers(original: RotaryFn) -> bool:
    """Whether the kernel gives ``original``'s outputs and input gradients bit for bit on a small input of the
    layout the attention forwards pass (transposed projections, fewer key/value heads, cos/sin [1, T, D])."""
    gen = torch.Generator().manual_seed(0)
    t, d = 5, 36  # a half of 18: a full 16-lane block and a masked tail
    qp = torch.randn(1, t, 3 * d, generator=gen)
    kp = torch.randn(1, t, d, generator=gen)
    angles = torch.randn(1, t, d, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    grads = torch.randn(1, 3, t, d, generator=gen), torch.randn(1, 1, t, d, generator=gen)
    results = []
    with torch.enable_grad():
        for fn in (original, cpu_rotary.rotary_native):
            q = qp.clone().requires_grad_()
            k = kp.clone().requires_grad_()
            out = fn(q.view(1, t, 3, d).transpose(1, 2), k.view(1, t, 1, d).transpose(1, 2), cos, sin, 1)
            torch.autograd.backward(out, grads)
            results.append((*out, q.grad, k.grad))
    return all(a is not None and b is not None and torch.equal(a, b) for a, b in zip(*results))


def install(model: torch.nn.Module) -> list[str]:
    """Replace ``apply_rotary_pos_emb`` in the modeling modules of ``model`` (a supported architecture's causal LM or
    its PEFT model) where the kernel runs; returns the modules newly patched (empty: nothing to do, already done,
    another architecture, no kernel here, or a function the kernel does not reproduce, which the log says)."""
    arch = _architecture(model)
    if arch not in FUSED_OPS_ARCHITECTURES or not cpu_rotary.available():
        return []
    done = [name for name in _modeling_modules(model) if install_module(name)]
    if done:
        log.info("rotary: %s through kernels.cpu_rotary in %s", NAME, ", ".join(done))
    return done


def install_module(name: str) -> bool:
    """Replace ``apply_rotary_pos_emb`` in the (imported) module ``name``; False where it was already replaced, its
    function takes other arguments or computes other numbers (the log says so), or the kernel does not run here."""
    module = sys.modules[name]
    current = getattr(module, NAME)
    if name in _ORIGINALS or hasattr(current, "_fs_original") or not cpu_rotary.available():
        return False
    if tuple(inspect.signature(current).parameters) != PARAMETERS:
        log.info("rotary: %s.%s takes other arguments; it stays transformers'", name, NAME)
        return False
    if not _same_numbers(current):
        log.warning("rotary: %s.%s does not compute the kernel's rotation; it stays transformers'", name, NAME)
        return False
    _ORIGINALS[name] = current
    setattr(module, NAME, replacement(current))
    return True


def uninstall() -> None:
    """Put back transformers' functions that :func:`install` replaced (wherever it did)."""
    for name, original in list(_ORIGINALS.items()):
        module = importlib.import_module(name)
        if getattr(getattr(module, NAME, None), "_fs_original", None) is original:
            setattr(module, NAME, original)
        del _ORIGINALS[name]


def installed() -> dict[str, Any]:
    """The modeling modules whose function :func:`install` replaced, with transformers' function each had."""
    return dict(_ORIGINALS)
