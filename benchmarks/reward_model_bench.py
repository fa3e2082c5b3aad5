"""A reward model on the demo task's preference pairs: how well it learns the preference, and what scoring costs.

    python benchmarks/reward_model_bench.py [--model default] [--data resources/datasets/demo_preference.jsonl]
                                            [--steps 60] [--batch 4] [--lr 1e-4] [--threads 0]

Trains ``objective: reward`` (LoRA rank 16 on every linear layer, a float32 scalar head on the last token) on the
pairs, 10% of the prompts held out, evaluating every ``--steps``/4 steps, in a data home of its own (a temporary
folder). Prints the held-out pair accuracy and the mean reward gap (chosen minus rejected) at each evaluation, the
training time per step, the memory estimate against the measured peak (the process's resident peak on the CPU,
CUDA's allocated peak on a GPU) with the resident curve over the run (the peak after the first step, at each
evaluation and at the end: flat once the kernels' caches are full, within the first ten steps), and then, with
the saved folder loaded by ``RewardModel.load``: the held-out accuracy again (it must equal the run's last
evaluation) and the scoring speed in answers per second (batches of 8). Wall-clock figures move with whatever
else the machine runs; the load average is printed with them.

It runs as a training process does: restarted once with the engine's glibc malloc settings
(``core.process_env``). Measured 2026-12-07 (``benchmarks/RESULTS.md``, "A reward run's resident memory over 60
steps"): estimate 1950 MiB, peak 1849 MiB, reached by step 10 and flat to step 60. Before oneDNN's per-shape caches
were bounded (``engine.train.memory_budget.bound_onednn_caches``) the peak grew through the run: 1769 -> 2000 MiB
in a training process, 2003 -> 2787 MiB in this script's own process, which did not restart then.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(ROOT / "resources" / "datasets" / "demo_preference.jsonl"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    from finetune_studio.core.process_env import restart_with_engine_environment

    restart_with_engine_environment()  # the malloc settings of a training process (see the docstring)

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.models import resolve_model

    model = str(resolve_model(args.model))  # before the data home moves: the bundled model lives in the real one
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as home:
        os.environ["FINETUNE_STUDIO_HOME"] = home
        config = TrainConfig(
            model=model,
            dataset=args.data,
            objective="reward",
            max_steps=args.steps,
            batch_size=args.batch,
            learning_rate=args.lr,
            eval_every=max(1, args.steps // 4),
            validation_fraction=0.1,
            max_length=256,
            num_threads=args.threads,
            sample_prompts=0,
        )
        run(config)


def run(config) -> None:
    from finetune_studio.engine.datasets import load_dataset
    from finetune_studio.engine.datasets.split import split_by_prompt
    from finetune_studio.engine.reward_model import RewardModel
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    events: list = []
    started = time.perf_counter()
    result = train_run(config, reporter=Reporter(extra=events.append))
    seconds = time.perf_counter() - started
    steps = [e for e in events if e.type == "step"]
    print(
        f"model {Path(config.model).name}, {config.max_steps} steps of {config.batch_size} pairs, "
        f"lr {config.learning_rate:g}"
    )
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(
        f"training: {seconds:.1f} s in all (set-up and evaluations too), "
        f"{steps[-1].elapsed_s / len(steps):.2f} s a step"
    )
    print("step  held-out accuracy  reward gap  eval loss")
    for e in (e for e in events if e.type == "eval"):
        print(f"{e.step:>4}  {e.reward_accuracy:>17.1%}  {e.reward_margin:>10.3f}  {e.eval_loss:.4f}")
    first = steps[0]
    print(f"first step: accuracy {first.reward_accuracy:.1%}, gap {first.reward_margin:.3f}, loss {first.loss:.4f}")
    row = _run(result.run_id)
    estimate, peak = row.memory_budget_bytes, row.memory_peak_bytes
    if estimate and peak:
        print(
            f"memory: estimate {estimate / 2**20:.0f} MiB, measured peak {peak / 2**20:.0f} MiB "
            f"({estimate / peak:.2f}x)"
        )
    print(_memory_curve(steps, [e.step for e in events if e.type == "eval"]))

    _train, validation = split_by_prompt(load_dataset(config.dataset).examples, config.validation_fraction, config.seed)
    reward = RewardModel.load(result.adapter_dir)
    prompts = [ex.prompt for ex in validation]
    t0 = time.perf_counter()
    chosen = reward.score(prompts, [ex.chosen[-1].content for ex in validation])
    rejected = reward.score(prompts, [ex.rejected[-1].content for ex in validation])
    scoring = time.perf_counter() - t0
    correct = sum(c > r for c, r in zip(chosen, rejected))
    gap = sum(c - r for c, r in zip(chosen, rejected)) / len(validation)
    print(
        f"loaded from {result.adapter_dir.name}/: held-out accuracy {correct}/{len(validation)} "
        f"({correct / len(validation):.1%}), mean gap {gap:.3f}"
    )
    print(f"scoring: {2 * len(validation) / scoring:.1f} answers/s ({2 * len(validation)} answers, batches of 8)")


def _memory_curve(steps: list, evals: list[int]) -> str:
    """The resident peak (MiB) after the first step, after each evaluation's step and at the end, and how much the
    resident size grew from the first step to the last."""
    mib = 2**20
    marks = sorted({1, *evals, steps[-1].step})
    by_step = {e.step: e for e in steps}
    peaks = ", ".join(f"{s}: {by_step[s].memory_peak_bytes / mib:.0f}" for s in marks if s in by_step)
    grown = (steps[-1].memory_used_bytes - steps[0].memory_used_bytes) / mib
    return f"resident peak by step (MiB) {peaks}; resident size grew {grown:+.0f} MiB from step 1 to the last"


def _run(run_id: str):
    from finetune_studio.core.store import Store

    store = Store()
    try:
        return store.get_run(run_id)
    finally:
        store.close()


if __name__ == "__main__":
    main()
