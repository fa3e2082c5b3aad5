"""Which op implementations a run config's ``kernels: auto|triton|torch`` picks: the one rule the engine's kernel
wiring (``engine.train.model_patches.kernel_wiring``) applies and the memory estimator (``core.memory.estimate``)
counts, so that the estimate assumes the implementation the run will use.

``auto`` picks a kernel only for a (kernel, device) pair measured faster than the PyTorch path there
(``benchmarks/kernels_bench.py``, ``benchmarks/step_ab.py``); every other pair keeps the default, so an unmeasured
Triton kernel stays opt-in (``kernels: triton``). Pure Python: the GUI reads it without torch or the kernels package.
"""

from __future__ import annotations

# (kernel, device key) -> the implementation measured faster there. A device key is the device's kind ("cpu",
# "mps") or, for CUDA, "cuda:" and the GPU's name as torch names it ("cuda:NVIDIA H200"): see device_key.
# Add a row only with the figures from benchmarks/kernels_bench.py in benchmarks/RESULTS.md.
# ("dora_norm", "cpu") -> "chunked": the chunked PyTorch norm against peft's (which builds B @ A and W + s B A),
# a whole DoRA SFT step of SmolLM2-135M on the 2-core AVX-512 BF16 CPU (benchmarks/step_ab.py, one thread,
# bf16-mixed): 3.1 against 3.6 CPU s per step, the same losses.
MEASURED_FASTER: dict[tuple[str, str], str] = {("dora_norm", "cpu"): "chunked"}

KERNEL_SETTINGS = ("auto", "triton", "torch")  # the run config's ``kernels``


def device_key(kind: str, gpu_name: str = "") -> str:
    """The key of :data:`MEASURED_FASTER` for a device: its kind, or ``cuda:<GPU name>`` for a named CUDA GPU."""
    return f"cuda:{gpu_name}" if kind == "cuda" and gpu_name else kind


def measured_choice(kernel: str, device: str, default: str, triton_available: bool = True) -> str:
    """The implementation ``auto`` runs for ``kernel`` on ``device`` (a :func:`device_key`): the measured-faster one
    where it can run (a Triton kernel needs Triton), else ``default``."""
    choice = MEASURED_FASTER.get((kernel, device), default)
    return choice if choice != "triton" or triton_available else default


def dora_norm_impl(kernels: str, device: str, triton_available: bool = True) -> str | None:
    """The ``dora_weight_norm`` implementation for a config's ``kernels`` choice on ``device`` (a
    :func:`device_key`); None keeps peft's own norm (which builds the dense ``B @ A`` and ``W + s B A``)."""
    if kernels == "triton":
        return "triton"
    if kernels == "auto":
        choice = MEASURED_FASTER.get(("dora_norm", device))
        return None if choice == "triton" and not triton_available else choice
    return None


def logprobs_impl(kernels: str) -> str:
    """The ``token_logprobs`` implementation for a config's ``kernels`` choice (``auto``: the op's measured choice)."""
    return {"auto": "auto", "triton": "triton", "torch": "chunked"}[kernels]
