"""The engine's side of the memory budget: exact parameter counts, the data's longest batch, the measured peak.

- ``meta_param_counts``: builds the model from its config on the meta device (no weights, no memory), wraps it
  with the run's adapters exactly as training does, and counts total and trainable parameters: exact for any
  architecture transformers and PEFT can build (GPT-2's Conv1D, mixtures of experts, ...).
- ``data_lengths`` / ``longest_batch``: the longest rows of the tokenised training data, and the batch of
  them the run can put first.
- ``measured_peak``: CUDA allocator peak and reserved; on the CPU the process's resident peak (VmHWM).
- ``note_runtime_baseline``: the engine process's resident size after its imports, before anything is loaded,
  measured once per machine and versions and kept (``core.memory.runtime_baseline``): the runtime term of every
  CPU and MPS estimate, the app's panel's included.
- ``run_report``: the ``core.protocol.memory_report.MemoryReport`` for a run with all of the above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory import runtime_baseline as baseline
from finetune_studio.core.memory.estimate import (  # the estimate counts the caches at this bound
    ONEDNN_CACHE_ENTRIES,
    DataLengths,
    ModelShape,
    ParamCounts,
    states_8bit,
)
from finetune_studio.core.protocol.memory_report import MemoryReport, memory_report
from finetune_studio.engine.datasets.render import TokenizedPair

log = logging.getLogger(__name__)


def meta_param_counts(folder: str | Path, config: TrainConfig, trust_remote_code: bool = False) -> ParamCounts:
    """Total / trainable / NF4-quantisable parameters of ``folder``'s model with ``config``'s adapters,
    counted on the meta device. 4-bit methods are counted on the unquantised model (the same parameters)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_studio.engine.train import methods

    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    quantizable = _quantizable_params(model)
    # every method's adapters as training makes them; the initialisation (PiSSA's SVD, LoftQ) counts nothing
    peft_model = methods.build(model, config.replace(lora_init="default"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    eight_bit = sum(states_8bit(p.numel()) for p in peft_model.parameters() if p.requires_grad)
    return ParamCounts(total, trainable, quantizable, eight_bit, source="meta")


def _quantizable_params(model) -> int:
    """Weights of the linear layers (nn.Linear, GPT-2's Conv1D) but the output head: what NF4 quantises."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        Conv1D = torch.nn.Linear  # type: ignore[misc, assignment]
    head = model.get_output_embeddings()
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                total += module.weight.numel()
    return total


def data_lengths(examples: list, total: int = 0) -> DataLengths:
    """Row lengths and trained tokens of tokenised examples (a DPO pair gives its chosen and rejected rows)."""
    lengths, trained = [], []
    for item in examples:
        for row in (item.chosen, item.rejected) if isinstance(item, TokenizedPair) else (item,):
            lengths.append(len(row.input_ids))
            trained.append(row.trained_tokens)
    return DataLengths.of_rows(lengths, trained, total or len(examples))


def longest_batch(examples: list, batch_size: int, packed: bool = False) -> list[int]:
    """Indices of the ``batch_size`` examples with the longest rows (then the most trained tokens, then the
    lowest index): deterministic, so a resumed run computes the same batch. ``packed`` (``packing``): the
    examples with the most tokens (a DPO pair's chosen and rejected together), what a packed row's size is."""

    def key(i: int):
        item = examples[i]
        rows = (item.chosen, item.rejected) if isinstance(item, TokenizedPair) else (item,)
        size = (sum if packed else max)(len(r.input_ids) for r in rows)
        return (-size, -sum(r.trained_tokens for r in rows), i)

    return sorted(range(len(examples)), key=key)[: min(batch_size, len(examples))]


@dataclass(frozen=True)
class MeasuredPeak:
    """Peak bytes of a run: ``allocated`` = CUDA allocator peak or the CPU process's resident peak;
    ``reserved`` = CUDA's reserved peak (0 on the CPU)."""

    allocated: int
    reserved: int


def measured_peak(device: str) -> MeasuredPeak:
    if device == "cuda":
        import torch

        return MeasuredPeak(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
    return MeasuredPeak(resident_peak(), 0)


def resident_peak() -> int:
    """The process's resident-set high-water mark: VmHWM from /proc/self/status, else getrusage's maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_malloc_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB: large CPU tensors are then always mmapped and go back to the
    system when freed. By default glibc raises the threshold after each large free (up to 32 MiB), so later
    tensors of that size land in the heap and freed ones stay resident: a CPU step's resident peak was 12%
    higher that way (129 MiB above the process baseline instead of 72 on a small Llama), and it no longer
    matched what the tensors need. No effect on other C libraries (False there)."""
    return _mallopt((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt`` for each (parameter, value); False where there is no glibc or it refuses one."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return all([bool(libc.mallopt(param, value)) for param, value in settings])
    except (AttributeError, OSError):
        return False


M_TRIM_THRESHOLD = -1  # glibc mallopt parameter
STEP_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's own ceiling for its dynamic threshold on 64-bit systems
STEP_TRIM_THRESHOLD_BYTES = 128 * 1024  # glibc's default: free memory at the top of the heap goes back


def reuse_memory_between_steps() -> bool:
    """Once the model is loaded: CPU tensors up to 32 MiB come from the heap and freed ones are reused by the next
    step instead of going back to the system. With every large tensor mmapped (:func:`fix_malloc_threshold`) each
    step faulted in fresh zeroed pages for all its temporaries: a LoRA step of SmolLM2-135M took 4.4-4.9 CPU
    seconds instead of 2.3-2.4 (its resident peak was 1370 MiB instead of 1848). Loading keeps the 128 KiB
    threshold, so the weights' conversion buffers still go back to the system. False off glibc."""
    return _mallopt((M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, STEP_TRIM_THRESHOLD_BYTES))


ONEDNN_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's primitives, ideep's own


def bound_onednn_caches(entries: int = ONEDNN_CACHE_ENTRIES) -> bool:
    """Hold oneDNN's primitive cache and ideep's computation cache to ``entries`` each (1024 by default); a value
    the user set is kept. Every bf16 matrix product on the CPU (bf16-mixed's frozen linears and LoRA products, their
    input-gradient products) builds a primitive for its exact shape, about 0.29 MiB of generated code in each
    cache whatever the matrices' sizes, and keeps it: on the default model each new padded length of a batch (or
    of an evaluation batch) kept 4.6 MiB more heap in use (about 8 shapes; 11.5 MiB once the LoRA products ran in
    bf16 too). Those blocks, made among a step's temporaries, kept the freed temporaries around them from being
    reused: over 60 steps of the reward model on the demo pairs the heap grew 4x what the caches held and the
    resident peak grew with it, 1769 -> 2000 MiB in a training process (2003 -> 2787 without the engine's malloc
    settings); bounded, it stayed at 1656-1818 (``benchmarks/RESULTS.md``). With 64 entries a step still reuses
    its own shapes; a shape met again after being evicted is rebuilt: 1.6 ms of CPU a primitive, 13 ms for the 8
    of a batch length, against a step's 3-4 s. Both libraries read the setting once, when their cache is first
    used: True when this call set it now (it takes effect only if no bf16 product has run in this process yet),
    False when it was already set. The memory estimate counts both caches full
    (``core.memory.estimate.ONEDNN_CACHE_BYTES``)."""
    import os

    changed = False
    for name in ONEDNN_CACHES:
        if name not in os.environ:
            os.environ[name] = str(entries)
            changed = True
    return changed


def device_info(device: str) -> DeviceInfo:
    """What the training device has, as the engine's torch sees it (free memory now). On the CPU and MPS the
    process's baseline is the kept one (``core.memory.runtime_baseline``): the figure the app's panel uses too,
    not this process's own size (which depends on what it did before: a loaded tokenizer, a tokenised dataset)."""
    import torch

    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()  # this process's GPU (each rank's own under torchrun)
        return DeviceInfo("cuda", name, total, free, torch.cuda.is_bf16_supported())
    import psutil

    vm = psutil.virtual_memory()
    kind = "mps" if device == "mps" else "cpu"
    return DeviceInfo(kind, device, vm.total, vm.available, True, process_bytes=baseline.runtime_baseline().bytes)


def note_runtime_baseline() -> baseline.Baseline:
    """The kept baseline; when none is kept for this machine and these versions, this process's resident size
    now, kept. Called where an engine process has imported what a run imports and loaded nothing yet: the start of
    a run's set-up and of ``engine estimate``."""
    kept = baseline.kept_baseline()
    if kept:
        return baseline.Baseline(kept, True)
    import finetune_studio.engine.train.recipe  # noqa: F401  (what a run has imported when it starts)

    own = resident_now()
    if own <= 0:
        return baseline.runtime_baseline()
    try:
        baseline.keep_baseline(own)
    except OSError as exc:  # a read-only data directory: this process uses its figure, nothing is kept
        log.warning("the process baseline could not be kept: %s", exc)
    return baseline.Baseline(own, True)


def resident_now() -> int:
    """The process's resident size now (VmRSS, else psutil's rss); 0 when unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or refused: unknown
        return 0


def run_report(
    folder: str | Path,
    config: TrainConfig,
    device: DeviceInfo,
    examples: list | None = None,
    total_examples: int = 0,
    trust_remote_code: bool = False,
    world_size: int = 1,
) -> MemoryReport | None:
    """The run's memory report: counted parameters, fitted to ``examples`` (tokenised) when given; with
    ``world_size`` processes, one process's figures. None when the model's config cannot be read as a decoder
    shape."""
    try:
        shape = ModelShape.from_model_dir(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no memory estimate for this model: %s", exc)
        return None
    try:
        counts = meta_param_counts(folder, config, trust_remote_code)
    except Exception as exc:  # an architecture transformers cannot build from its config: keep the formula
        log.warning("parameters not counted on the meta device (%s); using the formula", exc)
        counts = None
    lengths = data_lengths(examples, total_examples) if examples else None
    return memory_report(shape, config, device, lengths, counts, world_size)
