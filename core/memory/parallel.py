"""Per-process (per-GPU) peak memory of a run on N processes, from the one-process estimate (``core.memory.estimate``).

Each process trains ``G / N`` examples of a global batch of ``G = batch_size x gradient_accumulation_steps``
in micro-batches of ``min(batch_size, G / N)`` rows, so activations and logits are those of that micro-batch.

- DDP: every process holds the whole model, adapter, gradients and optimizer states, as one process does
  (gradients are all-reduced in place: the engine asks DDP for bucket views, so no second copy).
- FSDP (``fully_shard`` on each decoder layer and on the root): a process keeps 1/N of every parameter,
  gradient and optimizer state, plus, unsharded while they compute, the root group (embeddings, final norm,
  output head) and at most two decoder layers (the one computing and the one prefetched):

      base_fsdp = base / N + (1 - 1/N) * (root + 2 * layer)
      adapter, gradients, optimizer states: / N (plus the same two layers' adapters, unsharded)

Pure Python, like the estimate it builds on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import (
    ALLOCATOR_SLACK,
    DTYPE_BYTES,
    ONEDNN_CACHE_BYTES,
    DataLengths,
    MemoryEstimate,
    ModelShape,
    ParamCounts,
    estimate_training_memory,
    resolve_compute_dtype,
)


def per_process_batch(config: TrainConfig, world_size: int) -> int:
    """Rows per micro-batch on each process: the global batch's share, at most ``batch_size``."""
    share = config.batch_size * config.gradient_accumulation_steps // max(1, world_size)
    return max(1, min(config.batch_size, share))


def estimate_per_process_memory(
    shape: ModelShape,
    config: TrainConfig,
    device: DeviceInfo,
    world_size: int,
    parallelism: str = "ddp",
    lengths: DataLengths | None = None,
    counts: ParamCounts | None = None,
) -> MemoryEstimate:
    """Peak bytes on each of ``world_size`` processes; ``world_size`` 1 is the one-process estimate.
    ``lengths`` and ``counts`` as for ``core.memory.estimate.estimate_training_memory``."""
    if world_size <= 1:
        return estimate_training_memory(shape, config, device, lengths, counts)
    local = config.replace(batch_size=per_process_batch(config, world_size))
    one = estimate_training_memory(shape, local, device, lengths, counts)
    note = f"per process, {world_size} processes ({parallelism.upper()})"
    if parallelism != "fsdp":
        return dataclasses.replace(one, notes=(*one.notes, note))
    n, layers = world_size, max(1, shape.num_hidden_layers)
    b = DTYPE_BYTES[resolve_compute_dtype(config, device)]
    root = (shape.embedding_params + shape.lm_head_params + shape.hidden_size) * b
    layer = max(0, one.base_weights - root) / layers
    gathered = min(2, layers)
    base = one.base_weights / n + (1 - 1 / n) * (root + gathered * layer)
    adapter_share = 1 / n + (1 - 1 / n) * gathered / layers

    tensors: dict[str, Any] = dict(
        base_weights=int(base),
        adapter_weights=int(one.adapter_weights * adapter_share),
        gradients=int(one.gradients * adapter_share),
        optimizer_states=int(one.optimizer_states / n),
        activations=one.activations,
        logits=one.logits,
        reference_forward=one.reference_forward,
    )
    slack = int(ALLOCATOR_SLACK[device.kind] * sum(tensors.values()))
    if device.kind == "cpu":  # each process keeps its own bf16 primitive caches (as estimate_training_memory)
        slack += ONEDNN_CACHE_BYTES
    return dataclasses.replace(one, **tensors, allocator_slack=slack, notes=(*one.notes, note))


def shared_device(device: DeviceInfo, processes: int) -> DeviceInfo:
    """Each process's share of a device that ``processes`` processes use together: the CPU's RAM (gloo ranks on
    one machine), an Apple GPU's unified memory. A CUDA GPU is one process's own (one process per GPU)."""
    if device.kind == "cuda" or processes <= 1:
        return device
    return dataclasses.replace(
        device, total_bytes=device.total_bytes // processes, free_bytes=device.free_bytes // processes
    )
