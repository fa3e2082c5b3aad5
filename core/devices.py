"""What the machine can train on, found without importing torch.

``detect_devices()`` lists NVIDIA GPUs (from ``nvidia-smi``), an Apple GPU (MPS, unified memory) and always
the CPU last, with total and free memory. It runs ``nvidia-smi`` once (2 s timeout) and caches the answer,
so the GUI should call it once at start-up or off the UI thread; later calls return at once.
``detect_devices(refresh=True)`` asks again (free memory changes as other programs run).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

KINDS = ("cuda", "cpu", "mps")
NVIDIA_SMI_TIMEOUT_S = 2.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceInfo:
    """One device a run can use; byte counts are 0 when unknown."""

    kind: str  # 'cuda' | 'cpu' | 'mps'
    name: str
    total_bytes: int
    free_bytes: int
    bf16_supported: bool
    index: int = 0
    # CPU: the resident memory of the process that will train, measured before the model loads (what its imports
    # and data already take); 0 when unknown, and the estimate then uses a constant
    process_bytes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def available_bytes(self) -> int:
        """Memory a run can count on: the free memory when known, else the total."""
        return self.free_bytes or self.total_bytes

    @property
    def label(self) -> str:
        return f"{self.name} ({self.total_bytes / 1024**3:.1f} GiB)"


def detect_devices(refresh: bool = False) -> tuple[DeviceInfo, ...]:
    """GPUs first (CUDA, then MPS), the CPU last; cached after the first call unless ``refresh``."""
    if refresh:
        _detect.cache_clear()
    return _detect()


def best_device(refresh: bool = False) -> DeviceInfo:
    """The device ``auto`` training would pick: the first GPU, else the CPU."""
    return detect_devices(refresh)[0]


@functools.lru_cache(maxsize=1)
def _detect() -> tuple[DeviceInfo, ...]:
    devices = list(_nvidia_gpus())
    mps = _apple_gpu()
    if mps is not None:
        devices.append(mps)
    devices.append(cpu_device())
    return tuple(devices)


def _nvidia_gpus() -> list[DeviceInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    # compute_cap needs a 2021+ driver; ask without it when the first query fails.
    for fields in ("name,memory.total,memory.free,compute_cap", "name,memory.total,memory.free"):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S,
                check=True,
            ).stdout
            return parse_nvidia_smi(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
    return []


def parse_nvidia_smi(text: str) -> list[DeviceInfo]:
    """Parse ``name, total MiB, free MiB[, compute capability]`` lines into devices.

    bf16 needs compute capability 8.0 (Ampere) or newer; without the capability column it is
    guessed from the name.
    """
    gpus = []
    for index, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        parts = [p.strip() for p in line.split(",")]
        name, total, free = parts[0], int(float(parts[1])), int(float(parts[2]))
        if len(parts) > 3 and parts[3] not in ("", "[N/A]"):
            bf16 = float(parts[3]) >= 8.0
        else:
            bf16 = any(
                tag in name
                for tag in (
                    "A100",
                    "A10",
                    "A30",
                    "A40",
                    "H100",
                    "H200",
                    "L4",
                    "L40",
                    "RTX 30",
                    "RTX 40",
                    "RTX 50",
                    "RTX A",
                    "B200",
                    "GH200",
                )
            )
        gpus.append(DeviceInfo("cuda", name, total * MIB, free * MIB, bf16, index))
    return gpus


def _apple_gpu() -> DeviceInfo | None:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    total = _sysconf_bytes("SC_PHYS_PAGES")
    # Unified memory: the GPU shares RAM with everything else; macOS lets it use about 3/4.
    return DeviceInfo("mps", "Apple GPU (MPS)", total * 3 // 4, 0, True)


def cpu_device() -> DeviceInfo:
    """The CPU with system RAM (``/proc/meminfo``, capped by a cgroup limit), else ``os.sysconf``."""
    total, free = _meminfo()
    limit = _cgroup_limit()
    if limit and (not total or limit < total):
        used = _read_int(Path("/sys/fs/cgroup/memory.current")) or 0
        total, free = limit, max(0, min(free or limit, limit - used))
    if not total:
        total = _sysconf_bytes("SC_PHYS_PAGES")
        free = _sysconf_bytes("SC_AVPHYS_PAGES")
    name = platform.processor() or platform.machine() or "CPU"
    return DeviceInfo("cpu", f"CPU ({name}, {os.cpu_count() or 1} cores)", total, free, True)


def _meminfo() -> tuple[int, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def _cgroup_limit() -> int | None:
    return _read_int(Path("/sys/fs/cgroup/memory.max"))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _sysconf_bytes(name: str) -> int:
    try:
        return int(os.sysconf(name)) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
