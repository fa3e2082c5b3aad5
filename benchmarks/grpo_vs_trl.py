"""GRPO: the engine's objective against TRL's GRPOTrainer, the same steps on one CPU thread a side.

``python benchmarks/grpo_vs_trl.py [--steps N] [--prompts P] [--group G] [--max-new-tokens T] [--repeats R]
[--threads 1] [--model default] [--json]``

Both sides train the same model (the bundled SmolLM2-135M-Instruct unless ``--model``) with fresh LoRA adapters
(rank 8, alpha 16, all linear layers, no dropout) on the same prompts (the demo task's training prompts, the
held-out ones left out), P prompts a step with G answers each sampled at the same temperature up to the same
number of new tokens, the same reward (the demo task's verifier: ``json_fields`` partial credit plus its exact
form, ``core.rewards``; TRL gets the same functions through its reward-function contract), the same KL weight
(the reference is the base model: the adapters switched off, on both sides), clip range, loss normalisation,
learning rate (linear schedule, no warm-up) and seed; one optimizer step per batch of answers. Each side runs in
a process of its own (``--worker``), one torch thread each, the runs alternated (ABBA over repeats) in one
invocation, and the load average is printed before and after each run (the machine is shared: read the figures
with it).

- ``studio``: ``engine.train.recipe.train_run`` with ``objective: grpo`` (the engine's own decode loop for the
  rollouts, with the adapters live and the KV cache preallocated, then the update);
- ``trl``: ``transformers`` + ``peft.get_peft_model`` + TRL's ``GRPOTrainer`` with its defaults except where they
  would make the runs differ: ``num_generations`` = G, ``per_device_train_batch_size`` = P x G (one generation
  batch per optimizer step), ``max_completion_length``, ``temperature``, ``beta``, ``epsilon``, ``loss_type``
  (sequence -> ``grpo``, token -> ``bnpo``, dr_grpo -> ``dr_grpo``), ``scale_rewards`` (``group``; ``none`` for
  dr_grpo), ``shuffle_dataset`` off, ``gradient_checkpointing`` as the engine's config (TRL's default is on),
  float32 on the CPU.

Figures: tokens/s counts every sequence's prompt and answer tokens (no padding) of steps 2..N over their wall
time, rollouts and update together (step 1 holds lazy initialisation); ``answer tok/s`` the answer tokens alone
(what was sampled and trained on). Memory: the process's resident set sampled every 10 ms during training, its
peak minus the resident set once the model and adapters were loaded ("above model"; ``tests/trl_crosscheck.py``'s
``Memory``, as ``benchmarks/train_bench.py``); the ratios are engine / TRL. The two sides sample different answers
(their random streams differ), so their lengths differ: compare tokens/s, not seconds per step.

Measured on the shared 2-core CPU (torch 2.13.0, transformers 5.24.0, TRL 1.16.0), SmolLM2-135M-Instruct, the
defaults (4 steps x 2 prompts x G 4, up to 32 new tokens, temperature 1, beta 0.04, loss sequence, LoRA r8, lr
1e-5), one run a side, three times: twice while other people's jobs held the load average at 8-16, once with the
machine nearly idle (load 1.0-2.7):

    run  side    tokens/s  tok/cpu-s  peak MiB  above model MiB   load average during the run
    1    engine      6.9          -      1913             1024   11.0 -> 13.4
    1    TRL         4.6          -      4054             2914   13.4 -> 11.5
    2    engine      8.4       80.6      1773              887   14.5 -> 15.9
    2    TRL         7.7       41.2      3700             2593   15.9 -> 8.0
    3    engine    100.9       99.6      1794              908    1.1 -> 1.0
    3    TRL        36.6       46.6      4329             3192    1.0 -> 2.7

Engine / TRL on the quiet machine (run 3): **2.75x the tokens/s** (2.14x per CPU second) at **0.28x the memory
above the loaded model** (peak resident set 0.41x). Under load: wall-clock tokens/s 1.51x and 1.09x (in run 2 TRL
ran as the load fell by half), 1.96x per CPU second (run 1 predates that column), memory above the model 0.35x
and 0.34x. The base model rarely answers in the task's format, so rewards stay near 0 on both sides: the
figures are of speed and memory, not of learning (``engine demo --rl`` measures learning).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the memory probe shared with benchmarks/train_bench.py

from trl_crosscheck import Memory, process_age  # noqa: E402

MIB = 2**20
LOSS_TYPES = {"sequence": "grpo", "token": "bnpo", "dr_grpo": "dr_grpo"}
# The demo task's verifier as rewards (core.rewards; engine.demo.rl's): the share of fields right, plus 1 for an
# exact answer; ``answer`` is the column holding the reference answer (the expected JSON object's text).
REWARDS = [
    {"kind": "json_fields", "column": "answer", "name": "fields"},
    {"kind": "json_fields", "column": "answer", "partial": False, "name": "exact"},
]


@dataclass
class Spec:
    """One side of the comparison: what the worker process trains."""

    impl: str  # studio | trl
    model: str
    dataset: str  # JSON Lines of SFT conversations: the user's prompt, the reference answer
    steps: int = 4
    prompts_per_step: int = 2
    group_size: int = 4
    max_new_tokens: int = 32
    max_length: int = 192
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    loss: str = "sequence"
    lora_rank: int = 8
    learning_rate: float = 1e-5
    seed: int = 42
    threads: int = 1


@dataclass
class Outcome:
    """What a worker reports (JSON in a file the parent names)."""

    impl: str
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time per step (all threads)
    step_tokens: list[int] = field(default_factory=list)  # prompt + answer tokens of the step's sequences
    step_answer_tokens: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # mean total reward per step
    first_step_s: float = 0.0  # process start -> end of step 1
    peak_mem_bytes: int = 0
    peak_mem_above_model_bytes: int = 0
    model_mem_bytes: int = 0
    threads: int = 0
    note: str = ""

    def _rate(self, tokens: list[int], seconds: list[float] | None = None) -> float:
        seconds = self.step_seconds if seconds is None else seconds
        times, toks = seconds[1:] or seconds, tokens[1:] or tokens
        return sum(toks) / max(sum(times), 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self._rate(self.step_tokens)

    @property
    def answer_tokens_per_s(self) -> float:
        return self._rate(self.step_answer_tokens)

    @property
    def tokens_per_cpu_s(self) -> float:
        """Per second of this process's CPU time: steadier than wall time on a shared machine."""
        return self._rate(self.step_tokens, self.step_cpu_seconds)


def training_prompts(limit: int) -> list[dict]:
    """The demo task's first ``limit`` training conversations (the held-out prompts left out)."""
    from finetune_studio.engine.demo.task import EVAL_FILE, SFT_FILE, read_jsonl

    held_out = {r["prompt"] for r in read_jsonl(EVAL_FILE)}
    return [r for r in read_jsonl(SFT_FILE) if r["messages"][0]["content"] not in held_out][:limit]


def prompt_tokens(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens of each prompt rendered with the chat template and the generation prompt (what both sides feed)."""
    from finetune_studio.engine.datasets.render import render_text
    from finetune_studio.engine.datasets.schema import Message

    return [
        len(tokenizer(render_text(tokenizer, (Message("user", p),), add_generation_prompt=True))["input_ids"])
        for p in prompts
    ]


# --- the two workers ----------------------------------------------------------------------------------------------


def engine_config(spec: Spec):
    from finetune_studio.core.config import TrainConfig

    return TrainConfig(
        model=spec.model,
        dataset=spec.dataset,
        objective="grpo",
        rewards=REWARDS,
        max_steps=spec.steps,
        batch_size=spec.prompts_per_step,
        max_length=spec.max_length,
        learning_rate=spec.learning_rate,
        lr_scheduler="linear",  # TRL's default schedule
        warmup_steps=0,
        lora_rank=spec.lora_rank,
        lora_alpha=2.0 * spec.lora_rank,
        seed=spec.seed,
        grpo_group_size=spec.group_size,
        grpo_max_new_tokens=spec.max_new_tokens,
        grpo_temperature=spec.temperature,
        grpo_beta=spec.beta,
        grpo_epsilon=spec.epsilon,
        grpo_loss=spec.loss,
        grpo_updates_per_batch=1,
        validation_fraction=0.0,
        eval_every=0,
        checkpoint_every=0,
        num_threads=spec.threads,
    )


def studio_worker(spec: Spec) -> Outcome:
    import torch

    from finetune_studio.core.protocol import events as ev
    from finetune_studio.engine.models import load_tokenizer
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    out = Outcome(spec.impl)
    mem = Memory("cpu")
    marks: list[tuple[float, float]] = []
    steps: list[tuple[float, float]] = []  # (mean answer length, mean reward)
    rollouts: dict[int, list[str]] = {}  # step -> the prompts of its answers

    def on_event(e) -> None:
        kind = getattr(e, "type", "")
        if isinstance(e, ev.Started):
            mem.mark_loaded()
            marks.append((time.perf_counter(), time.process_time()))
        elif isinstance(e, ev.Step):
            marks.append((time.perf_counter(), time.process_time()))
            steps.append((float(e.metrics.get("completion_length", 0.0)), float(e.metrics.get("reward", 0.0))))
            if e.step == 1:
                out.first_step_s = process_age()
        elif kind == "rollouts":
            rollouts.setdefault(e.step, []).extend(item["prompt"] for item in e.items)

    train_run(engine_config(spec), reporter=Reporter(extra=on_event))
    mem.finish(out)
    tokenizer = load_tokenizer(spec.model)
    answers = spec.prompts_per_step * spec.group_size
    for n, (length, reward) in enumerate(steps, start=1):
        answer_tokens = round(length * answers)
        out.step_answer_tokens.append(answer_tokens)
        out.step_tokens.append(answer_tokens + sum(prompt_tokens(tokenizer, rollouts.get(n, []))))
        out.rewards.append(reward)
    out.step_seconds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    out.step_cpu_seconds = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out.threads = torch.get_num_threads()
    if len(rollouts) < len(steps):
        out.note = f"only {len(rollouts)} of {len(steps)} steps reported their rollouts: prompt tokens undercounted"
    return out


def trl_worker(spec: Spec) -> Outcome:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.rewards import RewardSet

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec.threads)
    out = Outcome(spec.impl)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(spec.dataset).read_text(encoding="utf-8").splitlines() if line.strip()]
    data = Dataset.from_list(
        [{"prompt": r["messages"][:1], "answer": r["messages"][-1]["content"]} for r in rows]  # TRL's chat form
    )
    rewards = RewardSet(REWARDS)

    def task_reward(prompts, completions, answer, **kw) -> list[float]:
        return rewards.score(prompts, completions, {"answer": list(answer)}).total

    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=2 * spec.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    model = get_peft_model(model, lora)
    mem = Memory("cpu")
    mem.mark_loaded()
    marks: list[tuple[float, float]] = []
    seen: list[int] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))
            seen.append(state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))
            seen.append(state.num_input_tokens_seen)
            if state.global_step == 1:
                out.first_step_s = process_age()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
                out.rewards.append(float(logs.get("reward", 0.0)))

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-bench-", dir=os.environ.get("FINETUNE_STUDIO_HOME")),
        per_device_train_batch_size=spec.prompts_per_step * spec.group_size,
        gradient_accumulation_steps=1,
        num_generations=spec.group_size,
        max_completion_length=spec.max_new_tokens,
        temperature=spec.temperature,
        beta=spec.beta,
        epsilon=spec.epsilon,
        loss_type=LOSS_TYPES[spec.loss],
        scale_rewards="none" if spec.loss == "dr_grpo" else "group",
        num_iterations=1,
        max_steps=spec.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=spec.seed,
        shuffle_dataset=False,
        gradient_checkpointing=TrainConfig().gradient_checkpointing,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=task_reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    mem.finish(out)
    out.step_seconds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    out.step_cpu_seconds = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out.step_tokens = [b - a for a, b in zip(seen, seen[1:])]
    answers = spec.prompts_per_step * spec.group_size
    out.step_answer_tokens = [round(n * answers) for n in lengths]
    out.threads = torch.get_num_threads()
    return out


# --- the parent: alternated runs and the table --------------------------------------------------------------------


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def run_worker(spec: Spec, timeout: float) -> Outcome:
    from finetune_studio.core.process_env import engine_environment

    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        result = Path(tmp) / "outcome.json"
        home = Path(tmp) / "home"
        home.mkdir()
        env = dict(
            engine_environment() if spec.impl == "studio" else os.environ,
            FINETUNE_STUDIO_HOME=str(home),
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
            return Outcome(spec.impl, note=f"timed out after {timeout:.0f} s")
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return Outcome(spec.impl, note="failed: " + " | ".join(tail))
        return Outcome(**json.loads(result.read_text()))


@dataclass
class Row:
    impl: str
    tokens_per_s: float
    answer_tokens_per_s: float
    tokens_per_cpu_s: float
    peak_mem_bytes: int
    peak_mem_above_model_bytes: int
    first_step_s: float
    rewards: list[float]
    runs: int
    note: str = ""


def summarise(impl: str, outcomes: list[Outcome]) -> Row:
    ok = [o for o in outcomes if o.step_seconds and not o.note.startswith(("failed", "timed out"))]
    if not ok:
        return Row(impl, 0.0, 0.0, 0.0, 0, 0, 0.0, [], 0, "; ".join(o.note for o in outcomes))
    med = statistics.median
    return Row(
        impl,
        med(o.tokens_per_s for o in ok),
        med(o.answer_tokens_per_s for o in ok),
        med(o.tokens_per_cpu_s for o in ok),
        int(med(o.peak_mem_bytes for o in ok)),
        int(med(o.peak_mem_above_model_bytes for o in ok)),
        med(o.first_step_s for o in ok),
        ok[0].rewards,
        len(ok),
        "; ".join(o.note for o in ok if o.note),
    )


def table(studio: Row, trl: Row) -> str:
    head = (
        f"{'impl':<7} {'tokens/s':>9} {'answer tok/s':>12} {'tok/cpu-s':>9} {'peak MiB':>9} {'above model MiB':>15} "
        f"{'1st step s':>10}  mean reward per step"
    )
    out = [head, "-" * len(head)]
    for r in (studio, trl):
        if not r.runs:
            out.append(f"{r.impl:<7} {r.note}")
            continue
        curve = " ".join(f"{x:.2f}" for x in r.rewards)
        out.append(
            f"{r.impl:<7} {r.tokens_per_s:>9.1f} {r.answer_tokens_per_s:>12.1f} {r.tokens_per_cpu_s:>9.1f} "
            f"{r.peak_mem_bytes / MIB:>9.0f} "
            f"{r.peak_mem_above_model_bytes / MIB:>15.0f} {r.first_step_s:>10.1f}  {curve}"
            + (f"  ({r.note})" if r.note else "")
        )
    if studio.runs and trl.runs:
        ratio = lambda x, y: x / y if y else float("nan")
        out.append(
            f"{'ratio':<7} {ratio(studio.tokens_per_s, trl.tokens_per_s):>8.2f}x "
            f"{ratio(studio.answer_tokens_per_s, trl.answer_tokens_per_s):>11.2f}x "
            f"{ratio(studio.tokens_per_cpu_s, trl.tokens_per_cpu_s):>8.2f}x "
            f"{ratio(studio.peak_mem_bytes, trl.peak_mem_bytes):>8.2f}x "
            f"{ratio(studio.peak_mem_above_model_bytes, trl.peak_mem_above_model_bytes):>14.2f}x "
            f"{ratio(studio.first_step_s, trl.first_step_s):>9.2f}x"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=4, help="answers per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--loss", choices=tuple(LOSS_TYPES), default="sequence")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternated (ABBA)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--model", default="default", help="'default' (the bundled model) or a model folder")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    ap.add_argument("--json", action="store_true", help="print the two rows as JSON instead of the table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = Spec(**json.loads(args.worker))
        outcome = (studio_worker if spec.impl == "studio" else trl_worker)(spec)
        Path(args.result).write_text(json.dumps(asdict(outcome)))
        return 0

    try:
        import trl
    except ImportError:
        print("TRL is not installed: pip install -e '.[bench]' (the benchmark-only extra)", file=sys.stderr)
        return 2
    import torch
    import transformers

    from finetune_studio.engine.models import resolve_model

    model = str(resolve_model(args.model))
    log = sys.stderr if args.json else sys.stdout
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}; CPU, "
        f"{args.threads} thread(s) a side; {Path(model).name}; {args.steps} steps x {args.prompts} prompts x "
        f"G {args.group}, up to {args.max_new_tokens} new tokens, temperature {args.temperature:g}, beta "
        f"{args.beta:g}, epsilon {args.epsilon:g}, loss {args.loss}, LoRA r{args.rank}, lr {args.lr:g}, seed "
        f"{args.seed}; {args.repeats} run(s) a side; {load_average()}",
        file=log,
        flush=True,
    )
    runs: dict[str, list[Outcome]] = {"studio": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="grpo-bench-data-") as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        rows = training_prompts(args.steps * args.prompts)
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for r in range(args.repeats):
            order = ("studio", "trl") if r % 4 in (0, 3) else ("trl", "studio")
            for impl in order:
                spec = Spec(
                    impl,
                    model,
                    str(dataset),
                    steps=args.steps,
                    prompts_per_step=args.prompts,
                    group_size=args.group,
                    max_new_tokens=args.max_new_tokens,
                    max_length=args.max_length,
                    temperature=args.temperature,
                    beta=args.beta,
                    epsilon=args.epsilon,
                    loss=args.loss,
                    lora_rank=args.rank,
                    learning_rate=args.lr,
                    seed=args.seed,
                    threads=args.threads,
                )
                before = load_average()
                t0 = time.perf_counter()
                o = run_worker(spec, args.timeout)
                print(
                    f"  {impl} run {r + 1}: {time.perf_counter() - t0:.0f} s, "
                    f"{o.note or f'{o.tokens_per_s:.1f} tokens/s'} ({before} before, {load_average()} after)",
                    file=log,
                    flush=True,
                )
                runs[impl].append(o)
    studio, base = summarise("studio", runs["studio"]), summarise("trl", runs["trl"])
    if args.json:
        print(json.dumps([asdict(studio), asdict(base)], indent=1))
    else:
        print("\n" + table(studio, base))
        print(
            "\ntokens/s: prompt + answer tokens of steps 2..N over their wall time (rollouts and update); answer "
            "tok/s: the sampled tokens alone; tok/cpu-s: over the process's CPU time (steadier on a shared "
            "machine); peak: the process's peak resident set; above model: minus the "
            f"resident set with the model and adapters loaded; ratios engine / TRL. {load_average()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
