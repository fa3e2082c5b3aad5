"""Which implementation ``impl='auto'`` picks, and the checks behind ``impl='triton'``.

``auto`` picks a Triton kernel only for a (kernel, device kind) pair that ``benchmarks/kernels_bench.py``
measured faster than the PyTorch path on that kind of device; every other pair keeps the PyTorch path, so an
unmeasured kernel stays opt-in (``impl='triton'``, or ``kernels: triton`` in the run config).

Triton is imported lazily: this package imports without it. ``TRITON_INTERPRET=1`` runs the kernels on CPU
tensors through Triton's interpreter, which is how the tests check them on machines without a GPU; Triton reads
it when ``@triton.jit`` decorates a kernel, so it must be set before ``triton_*`` kernel modules are imported.
"""

from __future__ import annotations

import os

import torch

# (kernel, device kind) -> the implementation measured faster there, for the ops' own ``impl='auto'``; a device kind
# is ``torch.device.type`` plus, for CUDA, the GPU's name as ``torch.cuda.get_device_name`` gives it (e.g.
# "cuda:NVIDIA H200"). A run's choice (config ``kernels``) follows ``core.kernel_choice.MEASURED_FASTER``, which the
# memory estimate reads too: this package may not import core, so the rows are written here as well and a test
# (tests/kernels/test_kernels_dora_norm.py) keeps the two equal. Add a row to both only with the figures from
# benchmarks/kernels_bench.py in benchmarks/RESULTS.md (the measurement behind each row is noted in core's).
MEASURED_FASTER: dict[tuple[str, str], str] = {("dora_norm", "cpu"): "chunked"}


def device_kind(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def measured_choice(kernel: str, device: torch.device | str, default: str) -> str:
    """The implementation ``auto`` runs for ``kernel`` on ``device``: the measured-faster one where it can run
    here (a Triton kernel needs the triton package), else ``default``. ``auto`` never fails for want of Triton."""
    choice = MEASURED_FASTER.get((kernel, device_kind(device)), default)
    return choice if choice != "triton" or triton_installed() else default


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless Triton can run on these tensors (a CUDA GPU, or the CPU interpreter)."""
    if not triton_installed():
        raise RuntimeError(
            "impl='triton' needs the 'triton' package (pip install triton; PyTorch's CUDA wheels for Linux "
            "bring it along); use impl='auto' or 'torch' (run config: kernels: auto) meanwhile"
        )
    if interpreting():
        bad = [t.device.type for t in tensors if t.device.type != "cpu"]
        if bad:
            raise RuntimeError(f"TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only, not on {bad[0]}")
        return
    bad = [t.device.type for t in tensors if t.device.type != "cuda"]
    if bad or not torch.cuda.is_available():
        where = bad[0] if bad else "this machine (no CUDA GPU)"
        raise RuntimeError(
            f"impl='triton' runs on CUDA GPUs, not on {where}; use impl='auto' or 'torch' "
            "(run config: kernels: auto), or set TRITON_INTERPRET=1 to check the kernels on the CPU (slow)"
        )
