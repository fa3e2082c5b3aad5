"""How many CPU threads torch computes with.

torch starts one thread per core. When anything else is busy on the machine (the app drawing live curves beside
the run, a browser, another run), that is far slower than one thread fewer: at every parallel region torch's
threads wait for the one whose core another process holds. On a busy 2-core CPU, 20 SFT steps of the default
model took 420 s with 2 threads and 79 s with 1, and ``generate`` made 2.9 new tokens/s with 2 threads against
13.6 with 1 (issue 13; ``benchmarks/RESULTS.md`` has the rerun with ``benchmarks/profile_step.py --levers``). So
the default leaves one physical core free; ``num_threads`` in the config, or ``OMP_NUM_THREADS`` in the
environment, overrides it.
"""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores this process may run on (logical CPUs when the count of physical ones is unknown)."""
    import psutil

    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or logical
    return max(1, min(physical, logical))


def auto_threads() -> int:
    """One fewer than the physical cores, at least 1."""
    return max(1, physical_cores() - 1)


def resolve_threads(requested: int) -> int:
    """``requested`` when above 0; else ``OMP_NUM_THREADS`` when set to a positive number; else :func:`auto_threads`."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return auto_threads()


def apply_threads(requested: int) -> int:
    """Set torch's intra-op thread count from the config value (0: automatic); returns the count set."""
    import torch

    n = resolve_threads(requested)
    torch.set_num_threads(n)
    return n
