"""The environment an engine process starts with: glibc malloc settings that keep a CPU run's memory down.

A CPU training step allocates and frees several GiB of tensors. Between steps the engine lets glibc reuse freed
heap memory (``engine.train.memory_budget.reuse_memory_between_steps``: about 2x faster steps than handing every large
block back to the system). But glibc's per-thread cache (tcache: up to 7 freed chunks of each size up to 1 KiB) and
its fastbins (chunks up to 160 bytes) hold small freed chunks as if they were in use, and a few such chunks left
between a step's large freed blocks keep those blocks from merging: the heap grew to twice what the step had in
use at once. With both turned off (``glibc.malloc.tcache_count=0``, ``glibc.malloc.mxfast=0``) a DPO step of the
default model kept 1148 MiB above the loaded model instead of 1857 (894 MiB in use at its peak), an SFT step 566
instead of 698, at the same speed (``benchmarks/RESULTS.md``, "The allocator's small-chunk caches").

glibc reads these settings (``GLIBC_TUNABLES``) once, when a process starts, so ``finetune-engine train`` (and
``demo``), however it was started (by the app, by hand, by torchrun), restarts itself once with them first thing
(:func:`restart_with_engine_environment`, called by ``engine.__main__``); the processes it starts inherit them.
:func:`engine_environment` gives the environment for a process started another way (the benchmarks' workers).
Settings the user put in ``GLIBC_TUNABLES`` are kept; other C libraries are left alone. The generation worker and
the app keep glibc's defaults.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES_ENV = "GLIBC_TUNABLES"
MALLOC_TUNABLES = {"glibc.malloc.tcache_count": "0", "glibc.malloc.mxfast": "0"}


def uses_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def merged_tunables(current: str | None) -> str:
    """``current`` (a ``GLIBC_TUNABLES`` value: ``name=value`` pairs joined by ':') with the engine's malloc settings
    added; a name the user already set keeps the user's value."""
    pairs = [p for p in (current or "").split(":") if p]
    named = {p.split("=", 1)[0] for p in pairs}
    pairs += [f"{name}={value}" for name, value in MALLOC_TUNABLES.items() if name not in named]
    return ":".join(pairs)


def engine_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) for an engine process: with the malloc settings on glibc."""
    env = dict(os.environ if environ is None else environ)
    if uses_glibc():
        env[TUNABLES_ENV] = merged_tunables(env.get(TUNABLES_ENV))
    return env


def has_engine_environment(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return not uses_glibc() or merged_tunables(env.get(TUNABLES_ENV)) == (env.get(TUNABLES_ENV) or "")


def restart_with_engine_environment() -> None:
    """Replace this process by itself, same interpreter, flags and arguments, with :func:`engine_environment`
    (once: after the restart the settings are there). Call it first thing, before threads or open files matter;
    only from a process's own entry point (never from a test that calls ``main(argv)`` in-process). Does nothing
    where the settings are there already, off glibc, or when the restart cannot be made."""
    if has_engine_environment():
        return
    argv = list(getattr(sys, "orig_argv", []) or [])
    if not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, engine_environment())
    except OSError:
        return
