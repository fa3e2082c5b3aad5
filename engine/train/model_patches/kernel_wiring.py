"""The run config's ``kernels: auto|triton|torch`` applied to the model: which op implementations a run uses.

* The output head's log-probs (``engine.train.forward``): ``torch`` is the chunked PyTorch path, ``triton`` the fused
  kernel, ``auto`` the op's own choice (the Triton kernel only where ``core.kernel_choice.MEASURED_FASTER`` has it
  faster on this kind of device).
* DoRA's weight norm: peft's ``DoraLinearLayer.forward`` builds ``B @ A`` and ``W + s B A`` (two weight-sized
  temporaries) each step to take a row norm it then detaches. ``install_dora_norm`` gives each DoRA linear layer
  of one model a forward that computes that norm with ``kernels.dora_norm`` instead and is otherwise peft's
  line for line. ``torch`` leaves peft's forward alone; ``auto`` patches only where a measurement says so
  (the chunked norm on the CPU: ``core.kernel_choice.MEASURED_FASTER``, which the memory estimate reads too).
* DoRA's output (``fused_ops: true``): peft's LoRA ``Linear.forward`` adds ``(m/n - 1) * base + (m/n) * s * lora``
  to the base output, and autograd keeps both ``base`` and ``lora`` for the magnitude's gradient.
  ``install_dora_output`` gives each plain (16/32-bit base) DoRA linear of one model a forward that computes
  ``(m/n) * (base + s * lora)`` with ``kernels.dora_output`` (one saved tensor, the output itself), its weight
  norm as above; anything but the plain training case (merged or disabled adapters, several active adapters, an
  active dropout) runs peft's forward.
* Plain LoRA's output (``fused_ops: true``): ``install_lora_linear`` gives each LoRA linear without a variant (no
  DoRA) over a frozen 16/32-bit ``nn.Linear`` (bf16-mixed's ``BF16FrozenLinear`` included) a forward through
  ``kernels.lora_linear``: the low-rank product added into the base output in place, one autograd node, the same
  numbers to float32 rounding; the same fall-back to peft's forward as DoRA's (a disabled adapter, as DPO's
  reference pass uses, runs peft's forward, which calls the base layer alone).
* bf16-mixed's adapters (with or without ``fused_ops``): over a ``BF16FrozenLinear`` base a plain LoRA linear
  goes through ``kernels.lora_linear`` with its adapter products in bf16 (``low_precision_adapters``: ``x A^T``,
  ``g B`` and the two weight gradients in bf16, A stacked under W so that ``x A^T`` and the input gradient's
  low-rank part ride on the base products; the sums, the adapter weights and their gradients float32). Measured in
  ``benchmarks/RESULTS.md`` ("The share of the CPU's matrix-product peak"): one SFT step 0.945x the CPU time for
  the bf16 products, 0.98x more for the stack; loss curves within float32's seed spread.
* Grouped projections (bf16-mixed with the fused ops): the LoRA linears of one module that read one input (q/k/v
  of an attention block, gate/up of a SwiGLU MLP: the modules ``fused_ops`` marks with ``_fs_projections``) share one
  stack, ``[W_q; A_q; W_k; A_k; W_v; A_v]`` (``kernels.grouped_lora_linear.stack_group``; each W a view of its rows,
  each layer's own ``[W; A]`` rows its ``_fs_stacked``), and the module's forward asks ``grouped_projections`` for
  their outputs: one product each way for the group (``kernels.grouped_lora_linear``), where each member would
  run ``lora_linear`` with its stack (the same numbers; the input gradient summed inside one product). ``GROUPED``
  switches it at each forward (the layers then run one by one over the same stacks). A group takes a bf16 input
  too (``group_ready`` says when, for the op that makes the input: ``fused_ops``' RMSNorm then writes bf16).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose

from finetune_studio.core import kernel_choice
from finetune_studio.core.config import ConfigError
from finetune_studio.engine.train.model_patches.mixed_precision import BF16FrozenLinear
from finetune_studio.kernels.dora_norm import IMPLS as DORA_IMPLS
from finetune_studio.kernels.dora_norm import dora_weight_norm
from finetune_studio.kernels.dora_output import dora_output
from finetune_studio.kernels.grouped_lora_linear import grouped_lora_linear, stack_group
from finetune_studio.kernels.lora_linear import lora_linear, stack_weight
from finetune_studio.kernels.selection import device_kind, require_triton, triton_installed

GROUPED = True  # a marked module's LoRA projections of one input through one stacked product (grouped_projections)

logprobs_impl = kernel_choice.logprobs_impl  # the ``token_logprobs`` impl for a config's ``kernels`` choice


def dora_norm_impl(kernels: str, device: torch.device | str) -> str | None:
    """The ``dora_weight_norm`` impl for a config's ``kernels`` choice on ``device`` (the rule the memory estimate
    counts: ``core.kernel_choice.dora_norm_impl``); None keeps peft's own forward."""
    return kernel_choice.dora_norm_impl(kernels, device_kind(device), triton_installed())


def dora_layers(model: torch.nn.Module) -> list[DoraLinearLayer]:
    """The DoRA parts of linear layers (not of embeddings or convolutions, whose norms differ)."""
    return [m for m in model.modules() if type(m) is DoraLinearLayer]


def install_kernels(
    model: torch.nn.Module, kernels: str, device: torch.device | str, fused_ops: bool = False
) -> list[str]:
    """Apply a config's ``kernels`` choice (and, for DoRA's output, its ``fused_ops``) to ``model``; returns a line
    per change, for the run log.

    ``triton`` fails here (a ``ConfigError``), before training, when Triton cannot run on ``device``."""
    notes = []
    if kernels == "triton":
        try:
            require_triton(torch.empty(0, device=device))
        except RuntimeError as exc:
            raise ConfigError("kernels", f"'triton' cannot run here: {exc}") from None
        notes.append(
            "Kernels: the output head's log-probs in the fused Triton kernel (where the head is a plain linear map)"
        )
    impl = dora_norm_impl(kernels, device)
    if impl is not None:
        n = install_dora_norm(model, impl)
        if n:
            notes.append(f"Kernels: DoRA weight norms of {n} layers via dora_weight_norm(impl={impl!r})")
    if fused_ops:
        n = install_dora_output(model, impl)
        if n:
            notes.append(f"Fused ops: the outputs of {n} DoRA layers via dora_output (one tensor kept for backward)")
    # over bf16-mixed's bf16 bases the adapter products run in bf16 whether or not the fused ops are on (a choice of
    # the compute dtype, so both give the same numbers); with them on, every plain LoRA layer goes through lora_linear
    n = install_lora_linear(model, low_precision_adapters=True, low_only=not fused_ops)
    low = sum(1 for layer in lora_linears(model) if getattr(layer, "_fs_adapter_dtype", None) is not None)
    if n:
        notes.append(
            f"{'Fused ops' if fused_ops else 'bf16-mixed'}: {n} LoRA layers via lora_linear (the low-rank product "
            "added in place" + (f"; the adapter products of {low} over bf16 bases in bf16)" if low else ")")
        )
    groups = sum(1 for m in model.modules() if "_fs_group" in m.__dict__)
    if groups:
        notes.append(f"Fused ops: {groups} groups of LoRA projections of one input (q/k/v, gate/up), one product each")
    return notes


def install_dora_norm(model: torch.nn.Module, impl: str) -> int:
    """Route the weight norm of each DoRA linear layer in ``model`` through ``dora_weight_norm(impl=impl)``.

    Per instance (other peft models in the process keep peft's forward); ``uninstall_dora_norm`` undoes it.
    Returns the number of layers patched."""
    if impl not in DORA_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(DORA_IMPLS)}")
    layers = dora_layers(model)
    for layer in layers:
        layer._norm_impl = impl  # type: ignore[assignment]
        layer.forward = types.MethodType(_dora_forward, layer)  # type: ignore[method-assign]
    return len(layers)


def uninstall_dora_norm(model: torch.nn.Module) -> None:
    for layer in dora_layers(model):
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_norm_impl", None)


def dora_linears(model: torch.nn.Module) -> list[LoraLinear]:
    """peft's LoRA linears (16/32-bit bases; not bitsandbytes' 4-bit ones) with a DoRA magnitude."""
    return [m for m in model.modules() if type(m) is LoraLinear and len(m.lora_magnitude_vector) > 0]


def install_dora_output(model: torch.nn.Module, norm_impl: str | None) -> int:
    """Give each DoRA linear of ``model`` the forward that computes its output with ``kernels.dora_output`` and its
    weight norm with ``dora_weight_norm(impl=norm_impl)`` (None: peft's norm). Per instance; returns the count;
    ``uninstall_dora_output`` undoes it."""
    if norm_impl is not None and norm_impl not in DORA_IMPLS:
        raise ValueError(f"unknown impl {norm_impl!r}; choose one of {', '.join(DORA_IMPLS)}")
    layers = dora_linears(model)
    for layer in layers:
        layer._fs_norm_impl = norm_impl  # type: ignore[assignment]
        layer.forward = types.MethodType(_dora_linear_forward, layer)  # type: ignore[method-assign]
    return len(layers)


def uninstall_dora_output(model: torch.nn.Module) -> None:
    for layer in dora_linears(model):
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_fs_norm_impl", None)


def _plain_dora_adapter(layer: LoraLinear, args, kwargs) -> str | None:
    """The one active DoRA adapter when ``layer`` runs the plain training/eval case, else None (peft's forward)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name not in layer.lora_magnitude_vector:
        return None
    if layer.training and not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _dora_linear_forward(self, x, *args, **kwargs):
    """peft 0.21's ``lora.Linear.forward`` for one active DoRA adapter, the output through ``dora_output``."""
    name = _plain_dora_adapter(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base_layer = self.get_base_layer()
    result = base_layer(x)
    lora_A, lora_B, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
    dora = self.lora_magnitude_vector[name]
    x = self._cast_input_dtype(x, lora_A.weight.dtype)
    weight = dequantize_module_weight(base_layer)
    with torch.no_grad():  # detached, as in peft (DoRA paper, section 4.3)
        if self._fs_norm_impl is None:
            lora_weight = dora.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=name).to(x.dtype)
            weight_norm = dora.get_weight_norm(weight=weight.to(x.dtype), lora_weight=lora_weight, scaling=scaling)
        else:
            w = transpose(weight, dora.fan_in_fan_out)
            weight_norm = dora_weight_norm(w, lora_A.weight, lora_B.weight, scaling, impl=self._fs_norm_impl)
    bias = base_layer.bias
    base = result if bias is None else result - bias
    out = dora_output(base, lora_B(lora_A(x)), dora.weight, weight_norm.to(x.dtype), scaling)
    return (out if bias is None else out + bias).to(result.dtype)


def _dora_forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
    """peft 0.21's ``DoraLinearLayer.forward``, with the detached weight norm from ``dora_weight_norm``."""
    magnitude = self.weight
    weight = dequantize_module_weight(base_layer)
    with torch.no_grad():  # peft detaches the norm (DoRA paper, section 4.3)
        weight_norm = dora_weight_norm(
            transpose(weight, self.fan_in_fan_out), lora_A.weight, lora_B.weight, scaling, impl=self._norm_impl
        ).to(x.dtype)
    mag_norm_scale = (magnitude / weight_norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    bias = None
    if base_result is not None:
        bias = base_layer.bias
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, transpose(weight.to(x.dtype), self.fan_in_fan_out))
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


def lora_linears(model: torch.nn.Module) -> list[LoraLinear]:
    """peft's LoRA linears without a DoRA magnitude whose base is a plain frozen linear (16/32-bit; bf16-mixed's
    ``BF16FrozenLinear`` too, not a 4-bit one)."""
    out = []
    for m in model.modules():
        if type(m) is not LoraLinear or len(m.lora_magnitude_vector) > 0:
            continue
        base = m.get_base_layer()
        if type(base) in (torch.nn.Linear, BF16FrozenLinear) and not base.weight.requires_grad:
            out.append(m)
    return out


def install_lora_linear(model: torch.nn.Module, low_precision_adapters: bool = False, low_only: bool = False) -> int:
    """Give each plain LoRA linear of ``model`` (``lora_linears``) the forward through ``kernels.lora_linear``.
    ``low_precision_adapters``: over a bf16-mixed base (``BF16FrozenLinear``) the adapter's own rank-r products run
    in bf16 too (``lora_linear``'s ``adapter_dtype``; the sums and the adapter weights stay float32), and the base
    weight becomes the first rows of a [out + r, in] bf16 tensor whose last rows take A at each forward
    (``lora_linear``'s ``stacked``: ``x A^T`` comes out of the base product, the input gradient's low-rank part goes
    into the base's; no copy of W, r rows more). ``low_only``: only those layers (``install_kernels`` without the
    fused ops). Per instance; returns the count; ``uninstall_lora_linear`` undoes it (the base weight stays a view
    of its stack, the same values)."""
    layers = lora_linears(model)
    if low_only:
        layers = [m for m in layers if low_precision_adapters and type(m.get_base_layer()) is BF16FrozenLinear]
    if low_precision_adapters:
        _install_groups(model, layers)
    for layer in layers:
        base = layer.get_base_layer()
        low = low_precision_adapters and type(base) is BF16FrozenLinear
        layer._fs_adapter_dtype = base.weight.dtype if low else None  # type: ignore[assignment]
        layer._fs_stacked = _stack(layer) if low else None  # type: ignore[assignment]
        layer.forward = types.MethodType(_lora_linear_forward, layer)  # type: ignore[method-assign]
    return len(layers)


def _stack(layer: LoraLinear) -> torch.Tensor | None:
    """The base weight moved into the first rows of a [out + r, in] tensor (``kernels.lora_linear.stack_weight``),
    for the one active plain adapter of rank r; None where there is no such adapter."""
    names = [n for n in layer.active_adapters if n in layer.lora_A and n not in layer.lora_variant]
    if len(names) != 1 or getattr(layer, "fan_in_fan_out", False):
        return None
    base = layer.get_base_layer()
    weight = cast(torch.Tensor, base.weight)
    old = getattr(layer, "_fs_stacked", None)
    if old is not None and old.data_ptr() == weight.data_ptr():
        return cast(torch.Tensor, old)
    rank = cast(torch.Tensor, layer.lora_A[names[0]].weight).shape[0]
    stacked = stack_weight(weight.detach(), rank)
    weight.data = stacked[: weight.shape[0]]
    return stacked


def uninstall_lora_linear(model: torch.nn.Module) -> None:
    for layer in lora_linears(model):
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_fs_adapter_dtype", None)
        layer.__dict__.pop("_fs_stacked", None)
    for module in model.modules():
        module.__dict__.pop("_fs_group", None)


@dataclass(frozen=True)
class _Group:
    """A module's LoRA projections of one input over one stack (``kernels.grouped_lora_linear.stack_group``)."""

    names: tuple[str, ...]
    layers: tuple[LoraLinear, ...]
    stacked: torch.Tensor
    rows: tuple[tuple[int, int], ...]  # each member's (out, r)
    weights: tuple[int, ...]  # each member's base weight's data_ptr in the stack


def _install_groups(model: torch.nn.Module, layers: list[LoraLinear]) -> int:
    """For each module marked with ``_fs_projections`` (layer names; ``fused_ops`` marks the attention blocks and
    MLPs whose forward calls ``grouped_projections``) whose named layers are all in ``layers``, plain LoRA linears
    over bf16-mixed bases of one input width with one active adapter each: one stack for the group, each base
    weight a view of its rows and each layer's ``_fs_stacked`` its ``[W; A]`` rows (which ``_stack`` then keeps).
    Returns the number of groups made (an intact group is kept)."""
    wired = {id(m) for m in layers}
    made = 0
    for module in model.modules():
        names = module.__dict__.get("_fs_projections")
        if not names:
            continue
        members = [getattr(module, n, None) for n in names]
        if not all(isinstance(m, LoraLinear) and id(m) in wired for m in members):
            continue
        group = cast(list[LoraLinear], members)
        if _intact(module.__dict__.get("_fs_group"), group):
            continue
        ranks = [_one_rank(m) for m in group]
        weights = [cast(torch.Tensor, m.get_base_layer().weight) for m in group]
        plain = all(type(m.get_base_layer()) is BF16FrozenLinear for m in group)
        if not plain or None in ranks or len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
            continue
        stacked, rows = stack_group([w.detach() for w in weights], cast(list[int], ranks))
        for layer, weight, member in zip(group, weights, rows, strict=True):
            weight.data = member[: weight.shape[0]]
            layer._fs_stacked = member
        shapes = tuple((w.shape[0], cast(int, r)) for w, r in zip(weights, ranks, strict=True))
        ptrs = tuple(w.data_ptr() for w in weights)
        module._fs_group = _Group(tuple(names), tuple(group), stacked, shapes, ptrs)  # type: ignore[assignment]
        made += 1
    return made


def _one_rank(layer: LoraLinear) -> int | None:
    """The rank of the one active plain adapter (as ``_stack`` stacks it); None without one such adapter."""
    names = [n for n in layer.active_adapters if n in layer.lora_A and n not in layer.lora_variant]
    if len(names) != 1 or getattr(layer, "fan_in_fan_out", False):
        return None
    return int(cast(torch.Tensor, layer.lora_A[names[0]].weight).shape[0])


def _intact(group: _Group | None, layers: list[LoraLinear]) -> bool:
    """``group`` still holds these layers' base weights (none replaced since it was made)."""
    return (
        group is not None
        and list(group.layers) == layers
        and all(cast(torch.Tensor, m.get_base_layer().weight).data_ptr() == p for m, p in zip(layers, group.weights))
    )


def grouped_projections(
    module: torch.nn.Module, x: torch.Tensor, names: tuple[str, ...], op: Callable[..., Any] = grouped_lora_linear
) -> tuple[torch.Tensor, ...] | None:
    """The outputs of ``module``'s LoRA linears ``names`` for x through one stacked product
    (``kernels.grouped_lora_linear``), when ``GROUPED`` and its group (``_install_groups``) runs the plain case:
    each layer wired with bf16 adapters, one active plain adapter (the same one), no active dropout, its base weight
    still the group's and its rank unchanged. None otherwise: call the layers one by one (peft's forward for a
    disabled adapter, as DPO's reference pass runs). ``op``: what takes the group's
    ``(x, stacked, biases, lora_as, lora_bs, scalings)`` (an op with ``grouped_lora_linear``'s arguments, e.g.
    ``kernels.grouped_qkv_rotary`` with its cos/sin bound)."""
    group = cast("_Group | None", module.__dict__.get("_fs_group"))
    if group is None:
        return None
    # a bf16 x with the bf16 stack (a norm that wrote bf16 for it, see ``group_ready``): float32 adapters as usual
    dtypes = (x.dtype, torch.float32) if x.dtype == group.stacked.dtype == torch.bfloat16 else (x.dtype,)
    arguments = _group_arguments(module, names, dtypes)
    if arguments is None:
        return None
    biases, lora_as, lora_bs, scalings = arguments
    return cast("tuple[torch.Tensor, ...]", op(x, group.stacked, biases, lora_as, lora_bs, scalings))


def group_ready(module: torch.nn.Module, names: tuple[str, ...]) -> bool:
    """Whether ``grouped_projections(module, x, names)`` takes the group now for a float32 x, over a bf16 stack: then
    it takes a bf16 x the same way (x's product is in bf16 either way), so the op that makes x may write it in bf16
    (``fused_ops``' RMSNorm). The same checks as ``grouped_projections`` (``GROUPED``, the group intact, each layer's
    one active plain adapter in float32, no active dropout, ...); False for a disabled adapter (DPO's reference
    pass)."""
    group = cast("_Group | None", module.__dict__.get("_fs_group"))
    return (
        group is not None
        and group.stacked.dtype == torch.bfloat16
        and _group_arguments(module, names, (torch.float32,)) is not None
    )


_Arguments = tuple[list["torch.Tensor | None"], list[torch.Tensor], list[torch.Tensor], list[float]]


def _group_arguments(
    module: torch.nn.Module, names: tuple[str, ...], dtypes: tuple[torch.dtype, ...]
) -> _Arguments | None:
    """(biases, lora_as, lora_bs, scalings) of ``module``'s group ``names`` when ``GROUPED`` and the group runs the
    plain case with adapters in one of ``dtypes`` (see ``grouped_projections``); None otherwise."""
    group = cast("_Group | None", module.__dict__.get("_fs_group"))
    if not GROUPED or group is None or group.names != names:
        return None
    biases: list[torch.Tensor | None] = []
    lora_as: list[torch.Tensor] = []
    lora_bs: list[torch.Tensor] = []
    scalings: list[float] = []
    adapter = None
    for layer, (out, r), ptr in zip(group.layers, group.rows, group.weights):
        parts = next((p for p in (_plain_lora_parts(layer, d, (), {}) for d in dtypes) if p is not None), None)
        if parts is None or (adapter is not None and parts[0] != adapter):
            return None
        if layer.__dict__.get("_fs_adapter_dtype") is None or "forward" not in layer.__dict__:
            return None
        name, base, a, b = parts
        weight = cast(torch.Tensor, base.weight)
        if weight.data_ptr() != ptr or weight.shape[0] != out or a.shape[0] != r:
            return None
        adapter = name
        biases.append(cast("torch.Tensor | None", base.bias))
        lora_as.append(a)
        lora_bs.append(b)
        scalings.append(float(layer.scaling[name]))
    if len({a.dtype for a in (*lora_as, *lora_bs)}) != 1:
        return None
    return biases, lora_as, lora_bs, scalings


def bf16_input_forward(layer: Any, x_like: torch.Tensor) -> Any:
    """The layer's own computation for a bf16 input, where it is bf16-mixed's stacked LoRA layer (this module's
    forward, a bf16 ``[W; A]`` stack, float32 adapters, no module or global hooks): the same numbers as its forward on
    the float32 input rounded to bf16, and its input gradient the bf16 product's result. None elsewhere."""
    forward = getattr(layer, "forward", None)
    if getattr(forward, "__func__", None) is not _lora_linear_forward:
        return None
    hooks = (layer._forward_hooks, layer._forward_pre_hooks, layer._backward_hooks, layer._backward_pre_hooks)
    if any(hooks) or torch.nn.modules.module._global_forward_hooks:
        return None
    if torch.nn.modules.module._global_forward_pre_hooks or torch.nn.modules.module._global_backward_hooks:
        return None
    parts = _plain_lora_parts(layer, x_like, (), {})
    low, stacked = getattr(layer, "_fs_adapter_dtype", None), getattr(layer, "_fs_stacked", None)
    if parts is None or low != torch.bfloat16 or stacked is None:
        return None
    name, base, lora_a, lora_b = parts
    weight, bias = cast(torch.Tensor, base.weight), cast("torch.Tensor | None", base.bias)
    if stacked.data_ptr() != weight.data_ptr() or stacked.shape[0] != weight.shape[0] + lora_a.shape[0]:
        return None
    scaling = layer.scaling[name]
    return lambda x: lora_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_dtype=low, stacked=stacked)


def _base_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """peft's ``get_base_layer()`` (the innermost ``base_layer``), read from the modules' own dicts: this runs on
    every forward of every adapted layer, where ``nn.Module.__getattr__``'s lookups cost microseconds each."""
    base = layer
    while "base_layer" in base._modules:
        base = cast(torch.nn.Module, base._modules["base_layer"])
    return base


def _plain_lora_parts(
    layer: LoraLinear, x: torch.Tensor | torch.dtype, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor] | None:
    """(the one active plain LoRA adapter, the base layer, its A and B weights) when ``layer`` runs the plain
    training/eval case for x (a tensor, or its dtype), else None (peft's). Submodules and parameters are read from
    the modules' dicts (see ``_base_layer``)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    modules = layer._modules
    lora_as, lora_bs = (
        cast(torch.nn.Module, modules["lora_A"])._modules,
        cast(torch.nn.Module, modules["lora_B"])._modules,
    )
    if name not in lora_as or name in layer.lora_variant or getattr(layer, "fan_in_fan_out", False):
        return None
    lora_a, lora_b = cast(torch.nn.Module, lora_as[name])._parameters, cast(torch.nn.Module, lora_bs[name])._parameters
    if lora_a.get("bias") is not None or lora_b.get("bias") is not None:
        return None
    a, b = lora_a.get("weight"), lora_b.get("weight")
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    if a is None or b is None or a.dtype != dtype or b.dtype != dtype:
        return None
    dropout = cast(torch.nn.Module, modules["lora_dropout"])._modules[name]
    if layer.training and not isinstance(dropout, torch.nn.Identity):
        return None
    base = _base_layer(layer)
    weight, bias = cast(torch.Tensor, base.weight), cast("torch.Tensor | None", base.bias)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    return name, base, a, b


def _lora_linear_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft 0.21's ``lora.Linear.forward`` for one active plain LoRA adapter, through ``kernels.lora_linear``."""
    parts = _plain_lora_parts(self, x, args, kwargs)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, base, lora_a, lora_b = parts
    weight, bias = cast(torch.Tensor, base.weight), cast("torch.Tensor | None", base.bias)
    low = cast("torch.dtype | None", getattr(self, "_fs_adapter_dtype", None))
    stacked = cast("torch.Tensor | None", getattr(self, "_fs_stacked", None))
    if stacked is not None and (
        low is None or stacked.data_ptr() != weight.data_ptr() or stacked.shape[0] != weight.shape[0] + lora_a.shape[0]
    ):
        stacked = None  # the base weight was replaced, another adapter is active, or the adapters run in float32
    return lora_linear(x, weight, bias, lora_a, lora_b, self.scaling[name], adapter_dtype=low, stacked=stacked)
