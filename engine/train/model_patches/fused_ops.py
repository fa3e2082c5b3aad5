"""Memory patches: a supported model's MLP, RMSNorm and attention forwards swapped for ``kernels``' fused ops.

``apply_memory_patches(model)`` rebinds, on each module instance of a Llama-family model (``core.memory.estimate
.FUSED_OPS_ARCHITECTURES``; SmolLM2 is a ``LlamaForCausalLM``), never on the classes (another model in the process
is untouched):

- every RMSNorm's forward to ``kernels.rms_norm`` (saves its input and a float32 rstd per row; float32 on a CPU
  with AVX-512 in one pass a row each way, ``kernels.cpu_rms_norm``); a decoder norm whose block takes its output
  through a group of LoRA projections over a bf16 stack (``kernel_wiring.group_ready``), which rounds it to bf16
  anyway, writes it in bf16 and takes its gradient in bf16 (``NORM_BF16``: the same numbers, no casts);
- every SwiGLU MLP's ``silu(gate) * up`` to ``kernels.swiglu`` (saves gate and up, not silu(gate) too; float32
  on a CPU with AVX-512 in one pass each way, ``kernels.cpu_swiglu``);
- every grouped-query attention's SDPA call, on the CPU, to ``kernels.attention`` (no repeated keys and values kept
  for backward; elsewhere transformers' own SDPA path runs);
- every Llama/Mistral/Qwen2/Qwen3 attention block's forward to one that, where bf16-mixed's LoRA wiring grouped
  q/k/v (``kernel_wiring.grouped_projections``: one stacked bf16 product each way for the three), takes them
  from it and is otherwise transformers' forward (rotary and the attention function looked up at each call);
  SwiGLU MLPs take gate/up the same way (elsewhere both run transformers' / the layers' own forward), and where
  down_proj takes a bf16 h, gate/up's product, its low-rank epilogue and SwiGLU run as one node
  (``kernels.grouped_swiglu``: no float32 casts of gate and up, the gradients written to bf16 in one pass);
- and, outside gradient checkpointing, the tensors those two ops output are not kept by the layers that consume
  them (the LoRA ``A`` projections of q/k/v, gate/up and down save their input for their weight gradient): they
  are recomputed in backward from what the ops keep anyway (``kernels.recompute.recompute_when_saved``).

It also replaces the modeling module's ``apply_rotary_pos_emb`` (a module attribute: process-wide) with one through
``kernels.cpu_rotary`` for float32 CPU tensors (one C pass each way), transformers' numbers bit for bit
(``model_patches.rotary``).

``apply_packed_attention(model)`` (``packing``, any architecture, with or without the fused ops) routes every
attention module's SDPA call the same way, so that a packed row (``engine.train.batches.pack``) runs on the CPU one
causal SDPA call per sequence instead of transformers' block-diagonal mask over the whole row; and the decoder's mask
builder skips that mask (a boolean [T, T], and as much again in temporaries while it is made: 14.7 GB for a row of
32 sequences of 3.8k tokens) for the forwards that run so (``split_packed_rows``, which
``engine.train.forward.LogprobModel`` enters for a packed batch).

The LoRA/DoRA linears stay PEFT's modules and compute as before; losses and gradients are those of the unpatched
model (tests/engine/test_memory_patches.py). Other architectures: nothing changes (a log line says so).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch

from finetune_studio.core.memory.estimate import FUSED_OPS_ARCHITECTURES
from finetune_studio.engine.train.model_patches import kernel_wiring, rotary
from finetune_studio.engine.train.model_patches.kernel_wiring import grouped_projections
from finetune_studio.kernels import grouped_qkv_rotary, grouped_swiglu
from finetune_studio.kernels import swiglu as swiglu_ops
from finetune_studio.kernels.attention import gqa_attention, is_attention_module, packed_attention, products_dtype
from finetune_studio.kernels.recompute import recompute_when_saved
from finetune_studio.kernels.rms_norm import rms_norm_forward, rms_norm_with_rstd
from finetune_studio.kernels.swiglu import swiglu, swiglu_forward

log = logging.getLogger(__name__)

SILU = ("silu", "swish")


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _architecture(model) -> str:
    return ((getattr(_causal_lm(model).config, "architectures", None) or [""])[0]) or type(_causal_lm(model)).__name__


def supported(model) -> bool:
    return _architecture(model) in FUSED_OPS_ARCHITECTURES


def _recompute_allowed(layer) -> bool:
    """The recompute hooks must not run inside a gradient-checkpointed block (its hooks must see every tensor)."""
    return layer is None or not (getattr(layer, "gradient_checkpointing", False) and layer.training)


NORM_BF16 = True  # a norm whose consumer rounds its output to bf16 anyway writes it in bf16 (_norm_out_dtype)


def _norm_out_dtype(norm: Any, x: torch.Tensor) -> torch.dtype | None:
    """bf16 where the module the norm feeds takes its output through its group of LoRA projections over a bf16 stack
    (``kernel_wiring.group_ready``), which rounds it to bf16 for its one product each way and gives its gradient as a
    bf16 product's result: the same numbers without the float32 output and its casts. None (the usual float32)
    elsewhere: ``NORM_BF16`` off, no group (grouping off, adapters disabled as in DPO's reference pass, ...), or a
    norm that feeds no such module (Qwen3's q_norm)."""
    consumer = norm.__dict__.get("_fs_consumer")
    if not NORM_BF16 or consumer is None or x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return None
    names = consumer.__dict__.get("_fs_projections")
    return torch.bfloat16 if names and kernel_wiring.group_ready(consumer, names) else None


def _norm_forward(self, hidden_states):
    out_dtype = _norm_out_dtype(self, hidden_states)
    out, rstd = rms_norm_with_rstd(hidden_states, self.weight, self.variance_epsilon, out_dtype=out_dtype)
    if self._fs_consumed:  # for the module it feeds, which takes it at once (see _consumer_forward)
        self._fs_pending = (out, hidden_states.detach(), rstd, out_dtype)
    return out


QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")  # read by kernel_wiring's grouping


def _bf16_down(down: Any, h_like: torch.Tensor) -> Any:
    """``down_proj``'s own computation for a bf16 h (``kernel_wiring.bf16_input_forward``: bf16-mixed's stacked LoRA
    layer rounds a float32 h to bf16 for its product and its input gradient is a bf16 product's result), so SwiGLU may
    write h in bf16 and take its gradient in bf16 (``kernels.swiglu`` ``out_dtype``), the same numbers without two
    casts of [tokens, width] each way. None elsewhere, or with ``kernels.swiglu.BF16_IO`` off."""
    if not swiglu_ops.BF16_IO or h_like.dtype != torch.float32:
        return None
    return kernel_wiring.bf16_input_forward(down, h_like)


def _gate_up_swiglu(x, stacked, biases, lora_as, lora_bs, scalings):
    """``grouped_projections``' op for gate/up: (h in bf16, its rebuild) through ``kernels.grouped_swiglu`` where it
    runs (no biases); None elsewhere (the MLP then takes gate and up as usual)."""
    if any(b is not None for b in biases) or not grouped_swiglu.runs_here(x, stacked):
        return None
    return grouped_swiglu.grouped_swiglu(x, stacked, lora_as, lora_bs, scalings)


def _mlp_forward(self, x):
    down = _bf16_down(self.down_proj, x.new_empty(0, dtype=torch.float32))
    fused = grouped_projections(self, x, GATE_UP, op=_gate_up_swiglu) if down is not None else None
    if fused is not None:  # gate/up's product, its epilogue and SwiGLU in one node, h in bf16
        h, rebuild = cast("tuple[torch.Tensor, Callable[[], torch.Tensor]]", fused)  # _gate_up_swiglu's result
        if not _recompute_allowed(self._fs_layer):
            return down(h)
        with recompute_when_saved(h, rebuild):
            return down(h)
    projected = grouped_projections(self, x, GATE_UP)
    gate, up = projected if projected is not None else (self.gate_proj(x), self.up_proj(x))
    down = _bf16_down(self.down_proj, gate)
    out_dtype = None if down is None else torch.bfloat16
    if down is None:
        down = self.down_proj
    h = swiglu(gate, up, out_dtype=out_dtype)
    if not _recompute_allowed(self._fs_layer):
        return down(h)
    g, u = gate.detach(), up.detach()
    with recompute_when_saved(h, lambda: swiglu_forward(g, u, out_dtype=out_dtype)):
        return down(h)


def _takes_group(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of a norm's consumer runs its group of LoRA projections (``kernel_wiring.group_ready``): an
    MLP always then, an attention block for a call ``_attention_forward`` takes the group for."""
    names = module.__dict__.get("_fs_projections")
    if not names or not kernel_wiring.group_ready(module, names):
        return False
    return names != QKV or _plain_attention_call(args, kwargs) is not None


def _consumer_forward(self, *args, **kwargs):
    """A module fed by a patched norm: the norm's output is recomputed in backward, not kept by this module. A bf16
    output (``_norm_out_dtype``) that this call would not take through the group (a cache, a check that no longer
    holds) is widened to float32 first: the module then sees the values the norm wrote, as a float32 tensor."""
    norm, layer = self._fs_norm, self._fs_layer
    pending, norm._fs_pending = norm._fs_pending, None
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    forward = self._fs_forward
    if pending is None or pending[0] is not x:
        return forward(*args, **kwargs)
    _, inp, rstd, out_dtype = pending
    weight = norm.weight
    widen = out_dtype is not None and not _takes_group(self, args, kwargs)
    if widen:
        x = x.to(weight.dtype)
        if args:
            args = (x, *args[1:])
        else:
            kwargs = {**kwargs, ("hidden_states" if "hidden_states" in kwargs else "x"): x}
    if not _recompute_allowed(layer):
        return forward(*args, **kwargs)

    def rebuild() -> torch.Tensor:
        out = rms_norm_forward(inp, weight, rstd, out_dtype)
        return out.to(weight.dtype) if widen else out

    with recompute_when_saved(x, rebuild):
        return forward(*args, **kwargs)


# attention classes whose forward ``_attention_forward`` reproduces, and where each passes a sliding window from:
# None (none passed), "config" (the config's), "module" (its own attribute)
_QKV_ATTENTION = {
    "LlamaAttention": None,
    "MistralAttention": "config",
    "Qwen2Attention": "module",
    "Qwen3Attention": "module",
}


def _plain_attention_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The hidden states of an attention call that ``_attention_forward`` takes q/k/v from the group for (the hidden
    states alone positionally or by name, rotary's cos/sin given, no cache); None for any other call."""
    hidden_states = args[0] if len(args) == 1 else kwargs.get("hidden_states") if not args else None
    plain = (
        isinstance(hidden_states, torch.Tensor)
        and kwargs.get("position_embeddings") is not None
        and kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None
    )
    return hidden_states if plain else None


def _qkv_rotary_op(module: Any, hidden_states: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
    """``grouped_projections``' op for q/k/v that also applies rotary in the same pass
    (``kernels.grouped_qkv_rotary``, this call's cos/sin bound), where that gives what the group and the modeling
    module's rotary give: no q/k norm before rotary (Qwen3), the modeling module's ``apply_rotary_pos_emb``
    ``model_patches.rotary``'s (``kernels.cpu_rotary``: transformers' numbers), the C passes running on these
    inputs (``grouped_qkv_rotary.runs_on``: its flag on, cos/sin as the C rotary takes them). None elsewhere: the
    group's outputs, then rotary."""
    if hidden_states is None or hasattr(module, "q_norm"):
        return None
    rotary_fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if getattr(rotary_fn, "_fs_original", None) is None:
        return None
    cos, sin = kwargs["position_embeddings"]
    if not grouped_qkv_rotary.runs_on(hidden_states, cos, sin, module.head_dim):
        return None
    return functools.partial(grouped_qkv_rotary.grouped_qkv_rotary, cos=cos, sin=sin, head_dim=module.head_dim)


def _attention_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers' attention forward (Llama, Mistral, Qwen2, Qwen3; 5.x) with q/k/v from
    ``grouped_projections`` where it gives them; the class's own forward otherwise (a cache, positional
    arguments, no group, adapters disabled). Rotary and the attention function are looked up at each call (the
    modeling module's ``apply_rotary_pos_emb``, transformers' attention interface), as the class's forward does."""
    hidden_states = _plain_attention_call(args, kwargs)
    rotated = _qkv_rotary_op(self, hidden_states, kwargs)  # q/k/v with rotary in one pass, where it runs
    group_op = () if rotated is None else (rotated,)
    qkv = grouped_projections(self, hidden_states, QKV, *group_op) if hidden_states is not None else None
    if qkv is None or hidden_states is None:
        return type(self).forward(self, *args, **kwargs)
    modeling = sys.modules[type(self).__module__]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
    cos, sin = kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    if rotated is not None:  # q and k rotated already; all three [B, H, T, D]
        query, key, value = qkv
    else:
        query, key, value = (t.view(hidden_shape) for t in qkv)
        if hasattr(self, "q_norm"):  # Qwen3: a norm of each head's q and k before rotary
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = modeling.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        value = value.transpose(1, 2)
    attention = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    window = _QKV_ATTENTION[type(self).__name__]
    if window is not None:
        source = self.config if window == "config" else self
        kwargs["sliding_window"] = getattr(source, "sliding_window", None)
    out, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _patch_attention_projections(module: Any) -> bool:
    """Give a known attention class's instance ``_attention_forward`` and mark its q/k/v for grouping (idempotent;
    before the norm's consumer wrapper, which calls it)."""
    if type(module).__name__ not in _QKV_ATTENTION or "_fs_projections" in module.__dict__:
        return False
    if not all(hasattr(module, n) for n in (*QKV, "o_proj", "head_dim", "scaling")):
        return False
    module.forward = types.MethodType(_attention_forward, module)
    module._fs_projections = QKV
    return True


ATTENTION = "finetune_studio_sdpa_gqa"  # registered with transformers' AttentionInterface (a new name only)


def _packed_lengths(module, query, key, kwargs) -> list[int] | None:
    """A packed row's sequence lengths (from ``cu_seq_lens_q``, see ``engine.train.forward.packed_inputs``) when its
    attention can run sequence by sequence on the CPU with the same numbers as transformers' block-diagonal mask;
    else None."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.device.type != "cpu" or query.shape[0] != 1 or torch.jit.is_tracing():
        return None
    plain = (
        kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("sinks") is None
        and not kwargs.get("output_attentions")
        and getattr(module, "is_causal", True)
        and key.shape[2] == query.shape[2] == int(cu[-1])
    )
    if not plain:
        return None
    lengths = torch.diff(cu).tolist()
    window = kwargs.get("sliding_window")
    return lengths if window is None or max(lengths) <= window else None


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, but on the CPU: a packed row sequence by sequence (``packed_attention``), and,
    on modules the fused ops patched, grouped key/value heads kept as they are (no repeat_kv) when a padding mask is
    given too (``kernels.attention``). Anything else goes to transformers' function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = _packed_lengths(module, query, key, kwargs)
    if lengths is not None:
        products = products_dtype(module)  # bf16-mixed's (mixed_precision.apply_mixed): the kernel's bf16 products
        out = packed_attention(query, key, value, lengths, scale=scaling, dropout=dropout, products=products)
        return out.transpose(1, 2).contiguous(), None
    cu = kwargs.get("cu_seq_lens_q")
    if attention_mask is None and cu is not None and len(cu) > 2 and query.shape[2] == key.shape[2] == int(cu[-1]):
        # a packed row whose mask was skipped (``split_packed_rows``) reaching a call that cannot run it sequence by
        # sequence (a softcap, sinks, a window shorter than a sequence): the mask, for this call only
        attention_mask = _block_causal_mask(cu, kwargs.get("sliding_window"), query.device)
    fast = (
        getattr(module, "_fs_gqa", False)
        and query.device.type == "cpu"
        and getattr(module, "num_key_value_groups", 1) > 1
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions")
        and query.shape[2] > 1
        and key.shape[2] == query.shape[2]
        and key.shape[-1] == value.shape[-1]
        and not torch.jit.is_tracing()
    )
    if not fast:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = gqa_attention(
        query,
        key,
        value,
        attention_mask,
        scale=scaling,
        dropout=dropout,
        is_causal=bool(causal),
        products=products_dtype(module),
    )
    return out.transpose(1, 2).contiguous(), None


_SPLIT_ROW: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("split_packed_row", default=None)


@contextlib.contextmanager
def split_packed_rows(lengths: list[int]) -> Iterator[None]:
    """Within it, a decoder set up by ``apply_packed_attention`` builds no mask for a packed row of these sequence
    lengths on the CPU: each routed attention module runs the row sequence by sequence (``_packed_lengths``) and reads
    nothing of a mask. Elsewhere (another device, padded rows, a sliding window shorter than a sequence, a cache)
    transformers' mask is built as before. Nothing changes for a decoder that was not set up so."""
    token = _SPLIT_ROW.set(tuple(int(n) for n in lengths))
    try:
        yield
    finally:
        _SPLIT_ROW.reset(token)


def _packed_row_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None, **kwargs
):
    """The decoder's mask builder (transformers' ``AttentionMaskInterface``, for the decoder's view of the config):
    None for the packed row of ``split_packed_rows`` on the CPU, whose attention runs sequence by sequence;
    otherwise transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    lengths = _SPLIT_ROW.get()
    skip = (
        lengths is not None
        and attention_mask is None
        and batch_size == 1
        and q_length == kv_length == sum(lengths)
        and not _offset(q_offset)
        and not _offset(kv_offset)
        and torch.device(kwargs.get("device", "cpu")).type == "cpu"
        and (local_size is None or max(lengths) <= local_size)
    )
    if skip:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )


def _offset(value) -> int:
    return int(value) if value is not None else 0


def _block_causal_mask(cu: torch.Tensor, window: int | None, device) -> torch.Tensor:
    """[1, 1, T, T] boolean: causal attention within each sequence of a packed row (``cu``: cumulative lengths),
    within ``window`` tokens when given (transformers' sliding window: q - k < window)."""
    lengths = torch.diff(cu.to(device=device, dtype=torch.long))
    pos = torch.arange(int(cu[-1]), device=device)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    return mask[None, None]


class _AttentionConfig:
    """An attention module's (or, with packing, the decoder's) view of the model config: the same object read and
    written through, except that 'sdpa' reads as ``ATTENTION``: the attention calls ``_sdpa_gqa`` and the decoder's
    mask builder ``_packed_row_mask`` (which builds transformers' SDPA mask but for a row that runs split). The
    config saved with the model is untouched."""

    def __init__(self, config):
        object.__setattr__(self, "_fs_config", config)

    @property
    def _attn_implementation(self):
        impl = self._fs_config._attn_implementation
        return ATTENTION if impl == "sdpa" else impl

    def __getattr__(self, name):
        return getattr(self._fs_config, name)

    def __setattr__(self, name, value):
        setattr(self._fs_config, name, value)


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers 5 has both
        return False
    AttentionInterface.register(ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(ATTENTION, _packed_row_mask)
    return True


def _is_gqa_attention(module) -> bool:
    return is_attention_module(module) and getattr(module, "num_key_value_groups", 1) > 1


def _route_attention(module) -> bool:
    """The module's SDPA attention goes through ``_sdpa_gqa`` (idempotent); False without transformers'
    AttentionInterface."""
    if isinstance(module.config, _AttentionConfig):
        return True
    if not _register_attention():
        return False
    object.__setattr__(module, "config", _AttentionConfig(module.config))
    return True


def _is_rms_norm(module) -> bool:
    name = type(module).__name__
    return name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")


def _is_swiglu_mlp(module) -> bool:
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    parts = all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    return type(module).__name__.endswith("MLP") and parts and act in SILU


def apply_memory_patches(model, enabled: bool = True) -> list[str]:
    """Patch ``model`` (a PEFT model or a causal LM) in place; returns what was patched ('gqa_attention', 'recompute',
    'rms_norm', 'rotary', 'swiglu'), empty when ``enabled`` is False or the architecture is not supported.
    Idempotent."""
    arch = _architecture(model)
    if not enabled:
        return []
    if arch not in FUSED_OPS_ARCHITECTURES:
        log.info("fused ops: %s is not a supported architecture; its modules run unchanged", arch)
        return []
    done: set[str] = set()
    for module in _causal_lm(model).modules():
        if getattr(module, "_fs_patched", False):
            continue
        if _is_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            module._fs_pending, module._fs_consumed = None, False
            module._fs_patched = True
            done.add("rms_norm")
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            module._fs_projections = GATE_UP
            object.__setattr__(module, "_fs_layer", None)  # plain attributes: not registered as submodules
            module._fs_patched = True
            done.add("swiglu")
        elif _is_gqa_attention(module) and _route_attention(module):
            module._fs_gqa = True
            module._fs_patched = True
            done.add("gqa_attention")
    for module in _causal_lm(model).modules():
        _patch_attention_projections(module)
    for layer in _causal_lm(model).modules():
        pairs = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
        if not all(hasattr(layer, n) for pair in pairs for n in pair):
            continue
        if getattr(layer.mlp, "_fs_patched", False):
            object.__setattr__(layer.mlp, "_fs_layer", layer)
        for norm_name, consumer_name in pairs:
            norm, consumer = getattr(layer, norm_name), getattr(layer, consumer_name)
            if getattr(norm, "_fs_patched", False) and not hasattr(consumer, "_fs_norm"):
                consumer._fs_forward = consumer.forward
                object.__setattr__(consumer, "_fs_norm", norm)
                object.__setattr__(norm, "_fs_consumer", consumer)  # (a plain attribute, as _fs_norm)
                object.__setattr__(consumer, "_fs_layer", layer)
                consumer.forward = types.MethodType(_consumer_forward, consumer)
                norm._fs_consumed = True
                done.add("recompute")
    if done and rotary.install(model):
        done.add("rotary")
    log.info("fused ops on %s: %s", arch, ", ".join(sorted(done)) or "nothing matched")
    return sorted(done)


def apply_packed_attention(model) -> int:
    """Route every attention module's SDPA call through ``_sdpa_gqa``, so that packed rows run sequence by sequence
    on the CPU (``kernels.attention.packed_attention``) instead of through a block-diagonal mask over the whole row
    (that costs attention over every pair of tokens of the row: 5x more CPU time for a row of 8 sequences of 60-140
    tokens). The decoder's mask builder is routed too: within ``split_packed_rows`` it builds no mask for such a row
    (the [T, T] mask and its temporaries were the step's largest allocations for long rows). Any architecture, with
    or without the fused ops; padded batches, other devices and models that do not use SDPA run as before. Returns
    the number of attention modules routed."""
    routed = 0
    for module in _causal_lm(model).modules():
        if is_attention_module(module) and _route_attention(module):
            routed += 1
    decoder = _decoder(model)
    if routed and decoder is not None and not isinstance(decoder.config, _AttentionConfig):
        # its mask builder then asks ``_packed_row_mask``, which skips the mask of a row that runs split
        object.__setattr__(decoder, "config", _AttentionConfig(decoder.config))
    log.info("packing: %d attention modules run packed rows sequence by sequence on the CPU", routed)
    return routed


def _decoder(model):
    """The module that builds the attention masks (the causal LM's decoder body), or None."""
    causal_lm = _causal_lm(model)
    return causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None


def count_patched(model) -> int:
    """Modules whose forward ``apply_memory_patches`` replaced."""
    return sum(1 for m in _causal_lm(model).modules() if getattr(m, "_fs_patched", False))
