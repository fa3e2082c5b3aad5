"""Measuring one training step on the CPU or CUDA: the tests' and the benchmarks' one copy.

``measure_step`` builds a small Llama from a config dict, wraps it with adapters and runs two training steps the
way the engine does (``engine.train.adapters.add_adapters``, ``engine.train.forward.LogprobModel``: the decoder body,
then the trained positions through the chunked output head; ``engine.train.losses``; for DPO the reference log-probs
first, under no_grad with the adapters disabled, as ``engine.train.recipe.Recipe`` does; AdamW), and measures:

- weights, adapters, gradients, optimizer states: exact tensor bytes;
- activations: the tensors autograd keeps for backward, caught with ``saved_tensors_hooks``, and the
  attention mask the blocks receive (gradient checkpointing keeps it to recompute them), counted once
  per storage and only if still alive when the forward pass ends;
- peak: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the largest bytes-in-use of glibc's
  malloc (``mallinfo2``, :class:`Malloc`) read after every aten op of the second step (:func:`peak_mode`), above
  what was in use before it less the parameters and optimizer states.

``tests/core/test_memory.py`` checks ``core.memory.estimate`` against it; ``benchmarks/memory_estimate.py`` and
``benchmarks/memory_grid.py`` print the figures, ``benchmarks/engine_vs_hf.py`` and ``benchmarks/saved_tensors.py``
use the malloc probe. The benchmarks put this folder on their ``sys.path``.

A process's history moves the CPU figures: garbage an earlier test left in reference cycles is freed whenever the
cyclic collector runs (``measure_step`` collects it before the baseline), and the engine's ``mallopt`` settings
(``engine.train.memory_budget``), applied by any in-process training run, stay for the life of the process.
:func:`measure_step_in_own_process` runs the measurement in a fresh ``python -P`` process, which the tests use.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from finetune_studio.core.config import TrainConfig


@dataclass(frozen=True)
class Measured:
    """Bytes measured for one config (see the module docstring for how)."""

    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer_states: int
    activations: int  # saved for backward by the blocks, the final norm and RoPE
    loss_saved: int  # saved for backward outside the blocks: the selected hidden states, targets, positions
    trainable_params: int
    peak: int  # whole step, every tensor, minus what was in use before the model existed


class Malloc:
    """Bytes in use by glibc malloc (arena + mmapped chunks): where CPU tensors live."""

    class _Info(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    def __init__(self) -> None:
        self._fn = ctypes.CDLL(None).mallinfo2
        self._fn.restype = self._Info

    def in_use(self) -> int:
        info = self._fn()
        return info.uordblks + info.hblkhd


def peak_mode(malloc: Malloc):
    from torch.utils._python_dispatch import TorchDispatchMode

    class PeakMode(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, malloc.in_use())
            return out

    return PeakMode()


def _build(cfg: dict, config: TrainConfig, dtype):
    """The base from ``cfg``, wrapped with adapters exactly as the engine does (``add_adapters``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_studio.engine.train.adapters import add_adapters
    from finetune_studio.engine.train.model_patches.fused_ops import apply_memory_patches, apply_packed_attention

    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**keep, attn_implementation="sdpa")).to(dtype)
    model.config.use_cache = False
    model = add_adapters(model, config)  # also turns on gradient checkpointing when asked
    apply_memory_patches(model, config.fused_ops)  # as engine.train.recipe.Recipe.setup does
    if config.packing:
        apply_packed_attention(model)
    model.train()
    return model


def _optimizer(params, name: str):
    import torch

    if name.endswith("8bit"):
        import bitsandbytes as bnb

        return (bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit)(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def _ragged_batch(cfg: dict, config: TrainConfig, rows: list[tuple[int, int]], device):
    """An engine ``Batch`` from (length, trained tokens) per row, as the collator pads them (right padding to
    the longest row); the last ``trained`` tokens of each row are trained (the answer). DPO: chosen rows, then
    rejected rows."""
    import torch

    from finetune_studio.engine.datasets.render import IGNORE
    from finetune_studio.engine.train.batches import Batch

    width = max(n for n, _ in rows)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (len(rows), width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (n, trained) in enumerate(rows):
        mask[i, :n] = 1
        labels[i, n - trained : n] = ids[i, n - trained : n]
    pairs = len(rows) // 2 if config.trains_on_pairs else 0
    return _maybe_packed(Batch(ids, mask, labels, pairs=pairs), config).to(device)


def _maybe_packed(batch, config: TrainConfig):
    """``batch`` as ``engine.train.batches.make_batch`` lays it out for ``config``: packed into one row with
    ``packing``."""
    from finetune_studio.engine.datasets.render import Tokenized
    from finetune_studio.engine.train.batches import Batch, pack

    if not config.packing:
        return batch
    rows = [
        Tokenized(ids[m.bool()].tolist(), labels[m.bool()].tolist())
        for ids, m, labels in zip(batch.input_ids, batch.attention_mask, batch.labels)
    ]
    ids, mask, labels, positions = pack(rows)
    return Batch(ids, mask, labels, pairs=batch.pairs, position_ids=positions)


def _batch(cfg: dict, config: TrainConfig, device):
    """An engine ``Batch``: every token trained (loss_on='all', the estimate's worst case), DPO rows stacked
    [chosen; rejected]. With more than one row the last is one token shorter, so there is a padding mask
    (as a collator makes for ragged lengths) while the trained tokens stay at the worst case."""
    import torch

    from finetune_studio.engine.datasets.render import IGNORE
    from finetune_studio.engine.train.batches import Batch

    rows = config.batch_size * (2 if config.trains_on_pairs else 1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (rows, config.max_length), generator=g)
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[-1, -1] = 0  # right padding on the last row
    labels = ids.masked_fill(mask == 0, IGNORE)
    pairs = config.batch_size if config.trains_on_pairs else 0
    if config.packing:  # full rows, each one's first token untrained (nothing before it in its sequence)
        mask = torch.ones_like(ids)
        return _maybe_packed(Batch(ids, mask, ids.clone(), pairs=pairs), config).to(device)
    return Batch(ids, mask, labels, pairs=pairs).to(device)


def _objective(model, config: TrainConfig, device: str):
    """The engine's reward objective for ``model`` (its head made as a run makes it), or None for the others."""
    if config.objective != "reward":
        return None
    from finetune_studio.engine.train.objectives import Reward, TrainedModel

    return Reward(TrainedModel(model, lambda batch: None, config, device, contextlib.nullcontext))


def _loss(model, config: TrainConfig, batch, objective=None):
    """The engine's loss for one micro-batch, as ``Recipe._micro_step`` computes it. Returns the loss and what
    the step keeps referenced until backward is done."""
    import torch

    from finetune_studio.engine.train.forward import LogprobModel
    from finetune_studio.engine.train.losses import dpo_loss, sequence_logps, sft_loss

    if objective is not None:  # the reward objective's own loss: its scalar head at each sequence's last token
        return objective.loss(batch, batch.pairs)[0], None
    logps = LogprobModel(model)
    if config.objective == "sft":
        out = logps(batch)
        return sft_loss(out.logps, batch.trained_tokens), out

    def pair_logps():  # Recipe._pair_logps
        out = logps(batch)
        seq = sequence_logps(out.logps, out.rows, out.batch, average=config.dpo_loss == "ipo")
        return seq[: batch.pairs], seq[batch.pairs :]

    with torch.no_grad(), model.disable_adapter():  # Recipe._reference_logps: first, without a graph
        ref_c, ref_r = pair_logps()
    pol_c, pol_r = pair_logps()
    losses, _, _ = dpo_loss(
        pol_c,
        pol_r,
        ref_c,
        ref_r,
        beta=config.dpo_beta,
        loss_type=config.dpo_loss,
        label_smoothing=config.dpo_label_smoothing,
    )
    return losses.sum() / batch.pairs, None


def measure_step(
    cfg: dict,
    config: TrainConfig,
    dtype_name: str = "float32",
    device: str = "cpu",
    rows: list[tuple[int, int]] | None = None,
) -> Measured:
    """Build the model from ``cfg`` (a config.json dict), run two training steps, return the figures.
    ``rows``: (length, trained tokens) per batch row for a ragged batch; default: full rows, all trained."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    malloc = None if cuda else Malloc()
    model = _build(cfg, config, dtype).to(device)
    from finetune_studio.engine.train.model_patches.kernel_wiring import install_kernels

    install_kernels(model, config.kernels, device, config.fused_ops)  # as Recipe.setup does (DoRA's norm, output)
    objective = _objective(model, config, device)
    extra = [p for m in (objective.extra_modules() if objective else {}).values() for p in m.parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad] + extra
    frozen = [p for p in model.parameters() if not p.requires_grad]
    param_ptrs = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *extra]}
    opt = _optimizer(trainable, config.optimizer)
    batch = _batch(cfg, config, device) if rows is None else _ragged_batch(cfg, config, rows, device)
    # Recipe._autocast: 16-bit autocast on CUDA only, around the forward (backward runs outside it)
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else contextlib.nullcontext()

    def step(record: bool) -> tuple[int, int]:
        saved: dict[int, list] = {}
        label = ["loss"]

        class Box:  # autograd holds the box; a dead box means the graph dropped the tensor
            __slots__ = ("t", "__weakref__")

            def __init__(self, t):
                self.t = t

        def pack(t):
            box = Box(t)
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in param_ptrs or not storage.nbytes():
                return box
            entry = saved.get(ptr)
            if entry is None or not any(r() is not None for r in entry[2]):  # new, or a freed address reused
                entry = saved[ptr] = [label[-1], storage.nbytes(), []]
            entry[2].append(weakref.ref(box))
            return box

        def leave(*_):
            label.pop()

        def block_mask(_module, _args, kwargs):  # kept by gradient checkpointing to recompute the block
            t = kwargs.get("attention_mask")
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in saved:
                saved[t.untyped_storage().data_ptr()] = ["act", t.untyped_storage().nbytes(), [weakref.ref(t)]]

        hooks = []
        blocks = [m for n, m in model.named_modules() if n.endswith(tuple(f"layers.{i}" for i in range(99)))]
        for m in blocks + [model.get_base_model().model.norm]:
            hooks.append(m.register_forward_pre_hook(lambda *_: label.append("act")))
            hooks.append(m.register_forward_hook(leave))
        hooks += [m.register_forward_pre_hook(block_mask, with_kwargs=True) for m in blocks]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t), autocast:
            loss, out = _loss(model, config, batch, objective)
        for h in hooks:
            h.remove()
        alive = {"act": 0, "loss": 0}
        for lab, nbytes, refs in saved.values():
            if any(r() is not None for r in refs):
                alive[lab] += nbytes
        loss.backward()
        del out, loss
        opt.step()
        if record:
            return alive["act"], alive["loss"]
        opt.zero_grad(set_to_none=True)
        return 0, 0

    def nbytes(ts):  # once per storage: 8-bit optimizers share their quantisation maps
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

    def state_tensors():
        return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]

    # Step 1 warms up (lazy imports, optimizer states); the peak is read over step 2. What is in use after
    # step 1, less the parameters and optimizer states, is the baseline that the peak is measured from.
    step(False)
    # What is garbage now (this model's step 1, an earlier model or test left in reference cycles) would otherwise
    # be freed whenever Python's cyclic collector next runs, perhaps during step 2, lowering the peak by its size:
    # collected here, before the baseline, with the collector's counters reset, step 2 runs the same in any process.
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        act, loss_saved = step(True)
        peak = torch.cuda.max_memory_allocated()
    else:
        base = malloc.in_use()
        mode = peak_mode(malloc)
        with mode:
            act, loss_saved = step(True)
        peak = mode.peak
    base -= nbytes([*model.parameters(), *extra]) + nbytes(state_tensors())
    peak -= base
    states = state_tensors()
    return Measured(
        base_weights=nbytes(frozen),
        adapter_weights=nbytes(trainable),
        gradients=nbytes(p.grad for p in trainable if p.grad is not None),
        optimizer_states=nbytes(states),
        activations=act,
        loss_saved=loss_saved,
        trainable_params=sum(p.numel() for p in trainable),
        peak=peak,
    )


def measure_step_in_own_process(
    cfg: dict,
    config: TrainConfig,
    dtype_name: str = "float32",
    device: str = "cpu",
    rows: list[tuple[int, int]] | None = None,
    timeout: float = 600,
    native_kernels: bool = True,
) -> Measured:
    """:func:`measure_step` in a fresh ``python -P`` process (this file run as a script, this environment), so that
    nothing this process did before (its allocator settings, its garbage, its heap's layout) moves the figures.
    ``native_kernels`` False: SwiGLU, RMSNorm and attention on torch's ops (as on a CPU without AVX-512), not the C
    kernels."""
    request = dict(cfg=cfg, config=config.to_dict(), dtype=dtype_name, device=device, rows=rows, native=native_kernels)
    with tempfile.TemporaryDirectory(prefix="measure-step-") as tmp:
        result = Path(tmp) / "measured.json"
        argv = [sys.executable, "-P", __file__, json.dumps(request), str(result)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"the measuring process failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return Measured(**json.loads(result.read_text(encoding="utf-8")))


if __name__ == "__main__":  # measure_step_in_own_process's child: the request as JSON, the file for the result
    request = json.loads(sys.argv[1])
    rows = [tuple(r) for r in request["rows"]] if request["rows"] is not None else None
    if not request.get("native", True):
        from finetune_studio.kernels import attention, rms_norm, swiglu

        rms_norm.NATIVE = swiglu.NATIVE = attention.NATIVE = False
    measured = measure_step(
        request["cfg"], TrainConfig.from_dict(request["config"]), request["dtype"], request["device"], rows
    )
    Path(sys.argv[2]).write_text(json.dumps(dataclasses.asdict(measured)), encoding="utf-8")
