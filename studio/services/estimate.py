"""The memory budget before a run, from ``core.memory.estimate`` (pure Python, well under a millisecond).

The device is found once in a background thread (``core.devices`` may run
``nvidia-smi`` with a 2 s timeout, which must not block the window); until it
is known, and whenever the model's shape cannot be read, the panel says so and
the engine's own figure (in its ``started`` event) fills in once the run starts.
On the CPU (and MPS) the runtime term is the engine process's baseline that the
engine measured and kept (``core.memory.runtime_baseline``), the same figure
``engine estimate`` and the run use; a stated default until it has.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo, detect_devices
from finetune_studio.core.memory import estimate as memory
from finetune_studio.core.memory.runtime_baseline import runtime_baseline
from finetune_studio.core.protocol.dataset_report import DatasetReport
from finetune_studio.core.protocol.memory_report import memory_report
from finetune_studio.studio.state.run import EstimateView

LABELS = {
    "base_weights": "base weights",
    "adapter_weights": "adapter",
    "gradients": "gradients",
    "optimizer_states": "optimizer",
    "activations": "activations",
    "logits": "output head",
    "reference_forward": "DPO reference",
    "runtime_overhead": "runtime",
    "allocator_slack": "allocator slack",
}


class DeviceProbe(QObject):
    """Finds the training device off the UI thread; ``found`` carries a DeviceInfo (or None), ``gpus`` how many
    CUDA GPUs ``nvidia-smi`` lists (with two or more, the page asks the engine which ones torch can use)."""

    found = Signal(object)
    gpus = Signal(int)

    def start(self) -> None:
        threading.Thread(target=self._run, name="device-probe", daemon=True).start()

    def _run(self) -> None:
        try:
            devices = detect_devices()
        except Exception:
            devices = ()
        self.found.emit(devices[0] if devices else None)  # queued to the UI thread: this object lives there
        self.gpus.emit(sum(d.kind == "cuda" for d in devices))


def model_shape(spec: str, model_info) -> memory.ModelShape | None:
    """The shape from the model panel's folder when there is one (a converted GGUF), else from the spec."""
    path = getattr(model_info, "path", "")
    if path and (Path(path) / "config.json").is_file():
        try:
            return memory.ModelShape.from_model_dir(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return memory.ModelShape.for_model_spec(spec) if spec else None


def data_lengths(dataset_info: DatasetReport | None) -> memory.DataLengths | None:
    """The longest rows from the dataset panel's report (``engine data inspect --json``), if it has them."""
    if dataset_info is None or dataset_info.tokens is None:
        return None
    return memory.DataLengths.from_token_stats(dataset_info.tokens, dataset_info.rows)


def counted_params(config: TrainConfig, model_info) -> memory.ParamCounts | None:
    """The engine's meta-device count (``model info --config``) when it was made for this method."""
    if getattr(model_info, "counted_for", "") != memory.counts_key(config) or not getattr(
        model_info, "total_params", 0
    ):
        return None
    return memory.ParamCounts(
        model_info.total_params,
        model_info.trainable_params,
        model_info.quantizable_params,
        model_info.optimizer_8bit_bytes,
    )


def engine_process(device: DeviceInfo) -> tuple[DeviceInfo, str]:
    """``device`` with the training process's baseline as the engine kept it (CPU, MPS; a GPU's runtime term is
    its CUDA context), and the label of the runtime term: says whether it was measured."""
    if device.kind == "cuda":
        return device, ""
    kept = runtime_baseline()
    label = "runtime (measured)" if kept.measured else "runtime (default until measured)"
    return dataclasses.replace(device, process_bytes=kept.bytes), label


def estimate(
    config: TrainConfig | None,
    model_info,
    device: DeviceInfo | None,
    dataset_info: DatasetReport | None = None,
    processes: int = 1,
) -> EstimateView:
    """The budget of one process; with ``processes`` > 1 (one per GPU), each GPU's share under the config's
    parallelism (``core.memory.parallel``), against ``device`` (one of the GPUs)."""
    if config is None:
        return EstimateView(note="Fix the settings marked in red to see the memory estimate.")
    if device is None:
        return EstimateView(note="Looking for the training device…")
    shape = model_shape(config.model, model_info)
    if shape is None:
        return EstimateView(
            device_name=device.name,
            device_total_bytes=device.available_bytes,
            note="No estimate until the model is known; the engine reports its budget when the run starts.",
        )
    lengths = data_lengths(dataset_info) if config.dataset else None
    device, runtime = engine_process(device)
    try:
        report = memory_report(shape, config, device, lengths, counted_params(config, model_info), processes)
    except Exception as exc:
        return EstimateView(note=f"No estimate for this set-up ({exc}).")
    labels = {**LABELS, "runtime_overhead": runtime} if runtime else LABELS
    parts = {labels.get(k, k): v for k, v in report.terms.items() if v}
    notes = "; ".join(report.notes)
    change = f" Cheapest change: {report.cheapest_change}." if report.cheapest_change else ""
    each = f" × {processes}, per GPU ({config.parallelism.upper()})" if processes > 1 else ""
    return EstimateView(
        report.total_bytes,
        parts,
        device.name + each,
        device.available_bytes,
        report.message + (f". {notes[:1].upper()}{notes[1:]}." if notes else "") + change,
        fits=report.verdict != "does not fit",
        lengths=report.lengths.description[:1].upper() + report.lengths.description[1:] + ".",
    )
