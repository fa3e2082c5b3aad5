"""Tokens/s of one config trained by 1, 2, ... processes (``train CONFIG --nproc N``), one GPU each.

    python -P benchmarks/distributed_scaling.py CONFIG [--procs 1,2,4,8] [--steps 30] [--set KEY=VALUE ...]

The global batch is the config's at every N (the engine splits it), so the same tokens go through each step and
the ratio of tokens/s to one process's is the scaling. Prints one row per N: median tokens/s over the steps after
the first few (compilation, allocator warm-up), the speed-up, the efficiency (speed-up / N), and the peak memory
rank 0 saw. On a machine without GPUs the processes share the CPU (gloo): the figures then say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from finetune_studio.core.protocol.events import parse_event

WARMUP = 3


def measure(config: str, procs: int, steps: int, sets: list[str]) -> tuple[float, int]:
    argv = [sys.executable, "-P", "-m", "finetune_studio.engine", "train", config, "--nproc", str(procs)]
    argv += ["--set", f"max_steps={steps}", "--set", "eval_every=0", "--set", "checkpoint_every=0"]
    for item in sets:
        argv += ["--set", item]
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "FINETUNE_STUDIO_HOME": home}
        out = subprocess.run(argv, capture_output=True, text=True, env=env)
    events = [parse_event(line) for line in out.stdout.splitlines() if line.strip()]
    failed = [e for e in events if e.type == "failed"]
    if failed or out.returncode:
        raise SystemExit(f"--nproc {procs} failed: {failed[-1].message if failed else out.stderr[-2000:]}")
    rows = [e for e in events if e.type == "step"][WARMUP:]
    return statistics.median(e.tokens_per_s for e in rows), max(e.memory_peak_bytes for e in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.procs.split(",")]
    base = None
    print(f"{'procs':>5} {'tokens/s':>12} {'speed-up':>9} {'efficiency':>10} {'peak GiB':>9}")
    for n in counts:
        tps, peak = measure(args.config, n, args.steps, args.set)
        base = base or tps / n  # per-process speed of the first row (with --procs 1,... that is one process's)
        speedup = tps / base
        print(f"{n:>5} {tps:>12.0f} {speedup:>9.2f} {speedup / n:>10.2f} {peak / 2**30:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
