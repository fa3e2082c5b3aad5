"""The memory budget before a run: a thin adapter over ``core.memory`` (written alongside the studio).

Everything here is defensive: if the estimator is missing or cannot judge this
model, the panel says so and the engine's own figure (in its ``started``
event) fills the gap once the run starts. The app never fails over an estimate.
"""

from __future__ import annotations

import importlib

from core.config import TrainConfig

from studio.state import MemoryEstimate

NO_ESTIMATOR = "No estimate before the run: the engine reports its budget when the run starts."


def estimate(config: TrainConfig | None, model_info) -> MemoryEstimate:
    if config is None:
        return MemoryEstimate(note="Fix the settings marked in red to see the memory estimate.")
    if model_info is None:
        return MemoryEstimate(note="The estimate appears once the model is known.")
    try:
        memory = importlib.import_module("core.memory")
    except ImportError:
        return MemoryEstimate(note=NO_ESTIMATOR)
    fn = getattr(memory, "estimate_training_memory", None) or getattr(memory, "estimate", None)
    if fn is None:
        return MemoryEstimate(note=NO_ESTIMATOR)
    try:
        device = _device(memory)
        result = _call(fn, memory, model_info, config, device)
    except Exception as exc:  # noqa: BLE001 - the estimator is someone else's moving target
        return MemoryEstimate(note=f"No estimate for this set-up ({exc}).")
    return _to_estimate(result, device)


def _device(memory):
    for mod_name in ("core.devices", "core.memory"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in ("detect_device", "current_device", "probe", "default_device"):
            fn = getattr(mod, name, None)
            if callable(fn):
                try:
                    return fn()
                except Exception:  # noqa: BLE001
                    return None
    return None


def _call(fn, memory, model_info, config, device):
    shape = model_info
    for name in ("ModelShape", "ModelSpec"):
        cls = getattr(memory, name, None)
        if cls is not None:
            from_event = getattr(cls, "from_model_ready", None) or getattr(cls, "from_event", None)
            if from_event:
                shape = from_event(model_info)
            break
    try:
        return fn(shape, config, device)
    except TypeError:
        return fn(shape, config)


def _to_estimate(result, device) -> MemoryEstimate:
    total = int(_get(result, "total_bytes", "total") or 0)
    parts = _get(result, "parts", "breakdown", "components") or {}
    if not isinstance(parts, dict):
        parts = {}
    if not parts:
        for key in ("weights_bytes", "adapter_bytes", "optimizer_bytes", "gradients_bytes", "activations_bytes",
                    "overhead_bytes", "reference_bytes"):
            v = _get(result, key)
            if v:
                parts[key.removesuffix("_bytes").replace("_", " ")] = int(v)
    name = str(_get(device, "name", "kind") or _get(result, "device_name", "device") or "")
    dev_total = int(_get(device, "total_bytes", "memory_bytes", "total_memory_bytes")
                    or _get(result, "device_total_bytes", "available_bytes") or 0)
    note = str(_get(result, "note", "warning") or "")
    return MemoryEstimate(total, {str(k): int(v) for k, v in parts.items() if v}, name, dev_total, note)


def _get(obj, *names):
    for n in names:
        if obj is None:
            return None
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return v
    return None
