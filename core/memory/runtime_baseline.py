"""The training process's own memory before it loads a model: the runtime term of every CPU (and MPS) estimate.

A run's resident peak is what its tensors need plus what the process held before loading: Python, torch,
transformers, peft and the engine imported. That baseline depends on the machine and the versions, not on the
config, so it is measured once (by the engine: ``engine.train.memory_budget.runtime_baseline``, in a fresh engine
process after its imports, before anything is loaded) and kept in the data directory as ``runtime_baseline.json``,
with the versions and machine it was measured for. The app's panel, ``engine estimate`` and the run's own estimate
all read that one figure (``kept_baseline``), so they agree; until the engine has measured it (the first
``estimate`` or run does), or after the versions change, every estimate uses ``DEFAULT_BASELINE_BYTES``.

Pure Python: the versions are read from the installed packages' metadata, nothing of them is imported (the GUI
reads this file too).
"""

from __future__ import annotations

import functools
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from finetune_studio.core.memory.estimate import PYTHON_BASELINE_BYTES
from finetune_studio.core.paths import atomic_write_text, data_dir

FILE_NAME = "runtime_baseline.json"
DEFAULT_BASELINE_BYTES = PYTHON_BASELINE_BYTES  # until measured: ~0.5 GiB, torch, transformers and peft imported
PACKAGES = ("torch", "transformers", "peft")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """What the baseline depends on: the machine, Python and the ML packages' versions ("" when not installed)."""
    out = {
        "machine": f"{platform.node()} {platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


@dataclass(frozen=True)
class Baseline:
    """The runtime term and where it comes from: ``measured`` (kept in the data directory) or the default."""

    bytes: int
    measured: bool

    @property
    def description(self) -> str:
        size = f"{self.bytes / 1024**2:.0f} MiB"
        if self.measured:
            return f"{size}, the engine process before loading (measured on this machine)"
        return f"{size}, a default until the engine measures this machine"


def baseline_path() -> Path:
    return data_dir() / FILE_NAME


def kept_baseline() -> int | None:
    """The measured baseline in bytes for this machine and these versions, or None when none is kept."""
    path = baseline_path()
    try:
        stat = path.stat()
    except OSError:
        return None
    return _read(str(path), stat.st_mtime_ns, stat.st_size, tuple(sorted(versions().items())))


def runtime_baseline() -> Baseline:
    """The kept figure, else the default."""
    kept = kept_baseline()
    return Baseline(kept, True) if kept else Baseline(DEFAULT_BASELINE_BYTES, False)


def keep_baseline(nbytes: int) -> None:
    """Keep ``nbytes`` as this machine's and these versions' baseline (replacing any other)."""
    if nbytes <= 0:
        raise ValueError(f"a process baseline must be positive, not {nbytes}")
    record = {"bytes": int(nbytes), "versions": versions()}
    atomic_write_text(baseline_path(), json.dumps(record, indent=1) + "\n")


@functools.lru_cache(maxsize=8)
def _read(path: str, _mtime_ns: int, _size: int, wanted: tuple[tuple[str, str], ...]) -> int | None:
    """(mtime and size key the cache: a rewritten file is read again.)"""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        nbytes, kept_for = int(record["bytes"]), record["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or from an older layout: measured again
    return nbytes if kept_for == dict(wanted) and nbytes > 0 else None
