"""Training speed and memory: the engine against transformers + PEFT + TRL, side by side.

``python benchmarks/train_bench.py [--quick] [--json] [--methods lora,qlora,dora] [--objectives sft,dpo]
[--steps N] [--repeats R] [--threads T] [--device cpu|cuda] [--no-packing]``

Both sides train the same model (the bundled default, SmolLM2-135M-Instruct, unless ``--model``), the same data
(the demo SFT or preference file), the same LoRA rank / alpha / targets, batch, length, learning rate, seed and
example order, each in its own process (``--worker``; the two sides are ``tests/trl_crosscheck.py``'s workers, which
the tests check against each other), the runs interleaved (ABBA over repeats):

- ``studio``: ``engine.train.recipe.train_run`` itself, the recipe the app runs (no eval, no checkpoints);
- ``baseline``: ``transformers.AutoModelForCausalLM`` + ``peft.get_peft_model`` + TRL's ``SFTTrainer``
  (assistant-only loss) or ``DPOTrainer`` (the PEFT model as its own reference, ``ref_model=None``),
  TRL's defaults otherwise, except where a default would make the two runs train differently: gradient
  checkpointing and bf16 (TRL turns both on by default) follow the engine's settings, the learning-rate schedule
  is linear on both sides (TRL's default), and the sampler is sequential over a dataset written in the engine's
  order, so both sides see the same batches. Both get the engine's tokens and masks (``engine.datasets.render``): TRL
  takes them as a tokenized dataset, ``input_ids`` with ``assistant_masks`` (which TRL always applies; its
  ``assistant_only_loss`` flag works on raw conversations only, with masks from its own training template) for
  SFT, and ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` for DPO (TRL's tokenizing step skipped). So step 1's
  loss must agree; later steps agree to the precision the two optimisers keep.

Figures: tokens/s counts the non-padding input tokens of steps 2..N (the first step holds lazy
initialisation) over their wall time; peak memory is the CUDA allocator's peak, on the CPU the process's peak
resident set (``ru_maxrss``); "above model" subtracts what was in use once the model and adapters were loaded
(CPU: the largest resident set sampled every 10 ms during training, minus the one at that point); first step
is the wall time from process start to the end of step 1. The engine's worker starts with the engine's glibc
malloc settings (``core.process_env``: the app and ``finetune-engine train`` start every training process with
them); the baseline's with the plain environment, as a script of its own would, or with the same settings under
``--same-allocator``. The equivalence of the loss and the LoRA gradients
on one batch is checked in detail by ``benchmarks/engine_vs_hf.py``. TRL is the ``bench`` extra in
``pyproject.toml``.
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
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the two sides, shared with the tests

from trl_crosscheck import Outcome, Spec, baseline_worker, studio_worker

from finetune_studio.core.process_env import engine_environment

MIB = 2**20


# --- the parent: interleaved runs and the table ---------------------------------------------------------------


def run_worker(spec: Spec, timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        result = Path(tmp) / "outcome.json"
        (Path(tmp) / "home").mkdir()
        # The engine's processes start with glibc's malloc settings (core.process_env); the baseline with the
        # plain environment, as a script of its own would (--same-allocator gives it the same settings).
        engine_env = spec.impl == "studio" or spec.same_allocator
        env = dict(
            engine_environment() if engine_env else os.environ,
            FINETUNE_STUDIO_HOME=str(Path(tmp) / "home"),
            OMP_NUM_THREADS=str(spec.threads),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        cmd = [sys.executable, "-P", __file__, "--worker", json.dumps(asdict(spec)), "--result", str(result)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(spec.impl, spec.method, spec.objective, note=f"timed out after {timeout:.0f} s")
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return Outcome(spec.impl, spec.method, spec.objective, note="failed: " + " | ".join(tail))
        return Outcome(**json.loads(result.read_text()))


@dataclass
class Row:
    method: str
    objective: str
    impl: str
    tokens_per_s: float
    tokens_per_cpu_s: float
    peak_mem_bytes: int
    peak_mem_above_model_bytes: int
    first_step_s: float
    losses: list
    final_loss: float | None
    runs: int
    note: str = ""
    compute: str = ""


def summarise(outcomes: list[Outcome]) -> Row:
    ok = [o for o in outcomes if o.losses and not o.note]
    first = outcomes[0]
    if not ok:
        return Row(first.method, first.objective, first.impl, 0.0, 0.0, 0, 0, 0.0, [], None, 0, first.note)
    med = statistics.median
    return Row(
        first.method,
        first.objective,
        first.impl,
        med(o.tokens_per_s for o in ok),
        med(o.tokens_per_cpu_s for o in ok),
        int(med(o.peak_mem_bytes for o in ok)),
        int(med(o.peak_mem_above_model_bytes for o in ok)),
        med(o.first_step_s for o in ok),
        ok[0].losses,
        ok[0].losses[-1],
        len(ok),
        compute=ok[0].compute,
    )


def step_one_check(studio: Row, base: Row) -> str:
    if not studio.losses or not base.losses:
        return "no step-1 comparison: a side failed (" + (studio.note or base.note) + ")"
    a, b = studio.losses[0], base.losses[0]
    # bf16-mixed rounds the frozen products to bf16: step 1 moves by about 1e-3 of the loss (float32: 1e-6)
    tol, how = (1e-2, " (studio in bf16-mixed: within bf16 rounding)") if studio.compute else (1e-4, "")
    if abs(a - b) <= tol * max(1.0, abs(b)):
        return f"step-1 loss agrees: {a:.6f} vs {b:.6f}{how}"
    return (
        f"step-1 loss DIFFERS: {a:.6f} vs {b:.6f}; the two sides did not train on the same tokens or weights "
        "(check the TRL version's collator and the model's dtype)"
    )


def table(pairs: list[tuple[Row, Row]]) -> str:
    head = (
        f"{'method':<6} {'obj':<4} {'impl':<9} {'tokens/s':>9} {'tok/cpu-s':>9} {'peak MiB':>9} {'above MiB':>10} "
        f"{'1st step s':>10} {'loss first / middle / last':>28}"
    )
    out = [head, "-" * len(head)]
    for s, b in pairs:
        for r in (s, b):
            if not r.losses:
                out.append(f"{r.method:<6} {r.objective:<4} {r.impl:<9} {r.note}")
                continue
            ls = r.losses
            curve = f"{ls[0]:.4f} / {ls[len(ls) // 2]:.4f} / {ls[-1]:.4f}"
            out.append(
                f"{r.method:<6} {r.objective:<4} {r.impl:<9} {r.tokens_per_s:>9.0f} {r.tokens_per_cpu_s:>9.0f} "
                f"{r.peak_mem_bytes / MIB:>9.0f} {r.peak_mem_above_model_bytes / MIB:>10.0f} "
                f"{r.first_step_s:>10.1f} {curve:>28}"
            )
        if s.losses and b.losses:
            ratio = lambda x, y: x / y if y else float("nan")
            ls, lb = s.losses, b.losses
            lr = " / ".join(f"{ratio(ls[i], lb[i]):.4f}" for i in (0, len(ls) // 2, -1))
            out.append(
                f"{'':<6} {'':<4} {'ratio':<9} {ratio(s.tokens_per_s, b.tokens_per_s):>8.2f}x "
                f"{ratio(s.tokens_per_cpu_s, b.tokens_per_cpu_s):>8.2f}x "
                f"{ratio(s.peak_mem_bytes, b.peak_mem_bytes):>8.2f}x "
                f"{ratio(s.peak_mem_above_model_bytes, b.peak_mem_above_model_bytes):>9.2f}x "
                f"{ratio(s.first_step_s, b.first_step_s):>9.2f}x {lr:>28}"
            )
        out.append(f"{'':<21}{step_one_check(s, b)}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 steps, one run per side (about 1 minute per run)")
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    ap.add_argument("--methods", default="lora,qlora,dora")
    ap.add_argument("--objectives", default="sft,dpo")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved (ABBA)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="default", help="'default' (the bundled model) or a model folder")
    ap.add_argument("--compute-dtype", default="auto", help="the studio side's compute_dtype (TrainConfig)")
    ap.add_argument("--no-packing", action="store_true", help="the studio side pads its batches (TrainConfig.packing)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker run")
    ap.add_argument("--save", help="also write the JSON rows to this file")
    ap.add_argument(
        "--same-allocator",
        action="store_true",
        help="start the baseline with the engine's glibc malloc settings too (core.process_env)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = Spec(**json.loads(args.worker))
        fn = studio_worker if spec.impl == "studio" else baseline_worker
        Path(args.result).write_text(json.dumps(asdict(fn(spec))))
        return 0

    try:
        import trl
    except ImportError:
        print("TRL is not installed: pip install -e '.[bench]' (the benchmark-only extra)", file=sys.stderr)
        return 2
    from finetune_studio.engine.models import resolve_model

    if args.quick:
        args.steps, args.repeats = 4, 1
    model = str(resolve_model(args.model))
    log = sys.stderr if args.json else sys.stdout
    import torch
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}; {args.device}, "
        f"{args.threads} thread(s) per side; {Path(model).name}; batch {args.batch_size}, max length "
        f"{args.max_length}, LoRA r{args.rank}, lr {args.lr:g}, {args.steps} steps x {args.repeats} run(s); "
        f"glibc malloc settings ({engine_environment().get('GLIBC_TUNABLES', 'none')}) for the engine"
        f"{' and the baseline' if args.same_allocator else ' only'}",
        file=log,
        flush=True,
    )
    pairs = []
    for method in args.methods.split(","):
        for objective in args.objectives.split(","):
            runs: dict[str, list[Outcome]] = {"studio": [], "baseline": []}
            for r in range(args.repeats):
                order = ("studio", "baseline") if r % 4 in (0, 3) else ("baseline", "studio")
                for impl in order:
                    spec = Spec(
                        impl,
                        method,
                        objective,
                        model,
                        steps=args.steps,
                        batch_size=args.batch_size,
                        max_length=args.max_length,
                        lora_rank=args.rank,
                        learning_rate=args.lr,
                        threads=args.threads,
                        device=args.device,
                        compute_dtype=args.compute_dtype,
                        same_allocator=args.same_allocator,
                        packing=not args.no_packing,
                    )
                    t0 = time.perf_counter()
                    o = run_worker(spec, args.timeout)
                    print(
                        f"  {method} {objective} {impl} run {r + 1}: {time.perf_counter() - t0:.0f} s "
                        f"{o.note or f'{o.tokens_per_s:.0f} tokens/s'}",
                        file=log,
                        flush=True,
                    )
                    runs[impl].append(o)
            pairs.append((summarise(runs["studio"]), summarise(runs["baseline"])))
    keys = ("method", "objective", "impl", "tokens_per_s", "tokens_per_cpu_s", "peak_mem_bytes")
    keys += ("peak_mem_above_model_bytes", "first_step_s", "losses")
    rows = [{**{k: getattr(r, k) for k in keys}, "final_loss": r.final_loss} for p in pairs for r in p]
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("\n" + table(pairs))
        print(
            "\ntokens/s: non-padding input tokens of steps 2..N / their wall time (tok/cpu-s: / this process's CPU "
            "time, steadier on a shared machine); peak: CUDA allocator peak, or the "
            "process's peak resident set on the CPU; above: minus what was in use with the model loaded; 1st step: "
            "from process start; ratios studio / baseline (losses: studio / baseline at first / middle / last step)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
