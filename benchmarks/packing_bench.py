"""Padding-free packing against padded batches: the engine's own step, CPU time, resident peak and padding.

``python benchmarks/packing_bench.py [--dataset FILE] [--objective sft|dpo] [--method lora] [--steps 5]
[--repeats 2] [--batch-size 4] [--max-length 512] [--threads 1] [--compute-dtype auto] [--json]``

Each run is its own process (``--worker``): ``engine.train.recipe.Recipe`` set up as a run does (the default model
unless
``--model``, the demo data unless ``--dataset``), then ``--steps`` optimizer steps of the run's own code
(``Recipe._step_batches``, ``Recipe._micro_step``, clipping, the optimizer step), the same examples in the same
order with ``packing`` off and on; the runs are interleaved (ABBA over ``--repeats``).

Figures: tokens/CPU-s counts the tokens present in steps 2..N over this process's CPU time for them (all threads;
less sensitive than wall time to other processes on a shared machine); step peak is the process's resident
high-water mark over the steps (VmHWM, reset after set-up through /proc/self/clear_refs), and "above set-up"
subtracts the resident memory once the model was loaded; padding is the share of a padded batch's positions that
are padding (batch x longest row against the tokens present), for the same batches either way; a packed batch
has none. The losses of both layouts are printed: they agree to float32 rounding (bf16-mixed: to its rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = {"sft": ROOT / "resources/datasets/demo_sft.jsonl", "dpo": ROOT / "resources/datasets/demo_preference.jsonl"}
MIB = 2**20


@dataclass
class Spec:
    packing: bool
    objective: str = "sft"
    method: str = "lora"
    model: str = "default"
    dataset: str = ""
    steps: int = 5
    batch_size: int = 4
    max_length: int = 512
    threads: int = 1
    compute_dtype: str = "auto"
    fused_ops: bool = True
    gradient_checkpointing: bool = False


@dataclass
class Outcome:
    packing: bool
    step_cpu_seconds: list = field(default_factory=list)
    step_tokens: list = field(default_factory=list)  # tokens present
    step_positions: list = field(default_factory=list)  # positions of the padded layout (batch x longest row)
    losses: list = field(default_factory=list)
    setup_rss_bytes: int = 0
    step_peak_rss_bytes: int = 0

    @property
    def tokens_per_cpu_s(self) -> float:
        times, toks = self.step_cpu_seconds[1:] or self.step_cpu_seconds, self.step_tokens[1:] or self.step_tokens
        return sum(toks) / max(sum(times), 1e-9)

    @property
    def padding(self) -> float:
        return 1 - sum(self.step_tokens) / max(sum(self.step_positions), 1)


def worker(spec: Spec) -> Outcome:
    import psutil
    import torch

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train import memory_budget
    from finetune_studio.engine.train.recipe import Recipe, StopFlag, micro_step
    from finetune_studio.engine.train.reporting import Reporter

    cfg = TrainConfig(
        model=spec.model,
        dataset=spec.dataset or str(DATA[spec.objective]),
        method=spec.method,
        objective=spec.objective,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        max_steps=spec.steps,
        validation_fraction=0.0,
        eval_every=0,
        checkpoint_every=0,
        num_threads=spec.threads,
        compute_dtype=spec.compute_dtype,
        fused_ops=spec.fused_ops,
        gradient_checkpointing=spec.gradient_checkpointing,
        longest_batch_first="off",
        packing=spec.packing,
    )
    recipe = Recipe(cfg, "packing-bench", Path(tempfile.mkdtemp()), None, Reporter(), StopFlag())
    setup = recipe.setup(resume=False)
    memory_budget.reuse_memory_between_steps()  # as Recipe.run does
    setup.model.train()
    out = Outcome(spec.packing, setup_rss_bytes=psutil.Process().memory_info().rss)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass
    for _ in range(spec.steps):
        t0 = time.process_time()
        batches, denom = recipe._step_batches(setup)
        loss = sum(micro_step(setup, b.to(setup.device), denom)["loss"] for b in batches)
        torch.nn.utils.clip_grad_norm_(setup.params, cfg.max_grad_norm)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        out.step_cpu_seconds.append(time.process_time() - t0)
        out.step_tokens.append(sum(b.tokens for b in batches))
        out.step_positions.append(sum(len(b.sequence_lengths) * max(b.sequence_lengths) for b in batches))
        out.losses.append(loss)
    out.step_peak_rss_bytes = memory_budget.resident_peak()
    return out


def run_worker(spec: Spec) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
        cmd = [sys.executable, "-P", __file__, "--worker", json.dumps(asdict(spec)), "--result", str(result)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return Outcome(**json.loads(result.read_text()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="", help="a data file (default: the demo SFT or preference file)")
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="runs per layout, interleaved (ABBA)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--no-fused-ops", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(Spec(**json.loads(args.worker)))
        Path(args.result).write_text(json.dumps(asdict(out)))
        return 0
    runs: dict[bool, list[Outcome]] = {False: [], True: []}
    for r in range(args.repeats):
        for packing in (False, True) if r % 4 in (0, 3) else (True, False):
            spec = Spec(
                packing,
                args.objective,
                args.method,
                args.model,
                args.dataset,
                args.steps,
                args.batch_size,
                args.max_length,
                args.threads,
                args.compute_dtype,
                not args.no_fused_ops,
                args.gradient_checkpointing,
            )
            runs[packing].append(run_worker(spec))
    rows = []
    for packing, outs in runs.items():
        rows.append(
            dict(
                packing=packing,
                tokens_per_cpu_s=statistics.median(o.tokens_per_cpu_s for o in outs),
                step_cpu_s=statistics.median(
                    statistics.median(o.step_cpu_seconds[1:] or o.step_cpu_seconds) for o in outs
                ),
                step_peak_rss_mib=statistics.median(o.step_peak_rss_bytes for o in outs) / MIB,
                above_setup_mib=statistics.median(o.step_peak_rss_bytes - o.setup_rss_bytes for o in outs) / MIB,
                padding=0.0 if packing else outs[0].padding,
                tokens=sum(outs[0].step_tokens),
                losses=outs[0].losses,
            )
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    data = Path(args.dataset).name if args.dataset else f"demo {args.objective}"
    print(
        f"{data}, {args.method} {args.objective}, batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.threads} thread(s), compute {args.compute_dtype}, {args.steps} steps x {args.repeats} runs each; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"{'packing':<8} {'tokens/CPU-s':>12} {'step CPU s':>10} {'peak MiB':>9} {'above set-up':>12} {'padding':>8}")
    for row in rows:
        print(
            f"{'on' if row['packing'] else 'off':<8} {row['tokens_per_cpu_s']:>12.0f} {row['step_cpu_s']:>10.2f} "
            f"{row['step_peak_rss_mib']:>9.0f} {row['above_setup_mib']:>12.0f} {100 * row['padding']:>7.1f}%"
        )
    off, on = rows
    print(
        f"packed / padded: {on['tokens_per_cpu_s'] / off['tokens_per_cpu_s']:.2f}x tokens per CPU second, "
        f"{on['above_setup_mib'] - off['above_setup_mib']:+.0f} MiB step peak above set-up; "
        f"largest loss difference {max(abs(a - b) for a, b in zip(off['losses'], on['losses'])):.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
