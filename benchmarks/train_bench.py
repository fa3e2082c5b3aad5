"""Training speed and memory: the engine against transformers + PEFT + TRL, side by side.

``python benchmarks/train_bench.py [--quick] [--json] [--methods lora,qlora,dora] [--objectives sft,dpo]
[--steps N] [--repeats R] [--threads T] [--device cpu|cuda] [--no-packing]``

Both sides train the same model (the bundled default, SmolLM2-135M-Instruct, unless ``--model``), the same data
(the demo SFT or preference file), the same LoRA rank / alpha / targets, batch, length, learning rate, seed and
example order, each in its own process (``--worker``), the runs interleaved (ABBA over repeats):

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
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune_studio.core.process_env import engine_environment

ROOT = Path(__file__).resolve().parent.parent
DATA = {"sft": ROOT / "resources/datasets/demo_sft.jsonl", "dpo": ROOT / "resources/datasets/demo_preference.jsonl"}
MIB = 2**20


@dataclass
class Spec:
    """One side of one case: what the worker process trains."""

    impl: str  # studio | baseline
    method: str  # lora | qlora | dora
    objective: str  # sft | dpo
    model: str
    steps: int = 8
    batch_size: int = 4
    max_length: int = 256
    lora_rank: int = 16
    learning_rate: float = 2e-4
    seed: int = 42
    threads: int = 1
    device: str = "cpu"
    dataset: str = ""  # empty: the demo SFT or preference file
    compute_dtype: str = "auto"  # the studio side's (auto: bf16-mixed on a CPU with AVX-512 BF16 / AMX)
    same_allocator: bool = False  # the baseline's process gets the engine's glibc malloc settings too
    packing: bool = True  # the studio side's TrainConfig.packing (the baseline ignores it: TRL keeps its defaults)


@dataclass
class Outcome:
    """What a worker reports (JSON in a file the parent names)."""

    impl: str
    method: str
    objective: str
    step_seconds: list = field(default_factory=list)
    step_cpu_seconds: list = field(default_factory=list)  # this process's CPU time per step (all threads)
    step_tokens: list = field(default_factory=list)  # non-padding input tokens per step
    losses: list = field(default_factory=list)
    first_step_s: float = 0.0  # process start -> end of step 1
    peak_mem_bytes: int = 0
    peak_mem_above_model_bytes: int = 0
    model_mem_bytes: int = 0
    threads: int = 0
    note: str = ""
    compute: str = ""  # the studio side's compute when it is not plain float32 (bf16-mixed on a fast-bf16 CPU)

    @property
    def tokens_per_s(self) -> float:
        times, toks = self.step_seconds[1:] or self.step_seconds, self.step_tokens[1:] or self.step_tokens
        return sum(toks) / max(sum(times), 1e-9)

    @property
    def tokens_per_cpu_s(self) -> float:
        """Less sensitive to other processes on a shared machine than wall-clock tokens/s."""
        times, toks = self.step_cpu_seconds[1:] or self.step_cpu_seconds, self.step_tokens[1:] or self.step_tokens
        return sum(toks) / max(sum(times), 1e-9)


# --- shared by both workers -----------------------------------------------------------------------------------


def engine_config(spec: Spec):
    from finetune_studio.core.config import TrainConfig

    return TrainConfig(
        model=spec.model,
        dataset=spec.dataset or str(DATA[spec.objective]),
        method=spec.method,
        objective=spec.objective,
        max_steps=spec.steps,
        learning_rate=spec.learning_rate,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        lora_rank=spec.lora_rank,
        lora_alpha=2.0 * spec.lora_rank,
        seed=spec.seed,
        lr_scheduler="linear",  # TRL's default schedule, so the loss curves stay comparable
        validation_fraction=0.0,
        eval_every=0,
        checkpoint_every=0,
        num_threads=spec.threads,
        compute_dtype=spec.compute_dtype,
        packing=spec.packing,
    )


def data_stream(spec: Spec, tokenizer) -> list[list]:
    """The engine's tokenized examples, batch by batch, in the engine's order (``Recipe.prepare_data`` and
    ``Sampler``): what both sides train on."""
    from finetune_studio.engine.train.batches import Sampler
    from finetune_studio.engine.train.recipe import Recipe, StopFlag
    from finetune_studio.engine.train.reporting import Reporter

    cfg = engine_config(spec)
    recipe = Recipe(cfg, "bench", Path("."), None, Reporter(), StopFlag())
    examples = recipe.prepare_data(tokenizer).train
    sampler = Sampler(len(examples), cfg.batch_size, cfg.seed)
    return [[examples[i] for i in sampler.next_indices()] for _ in range(spec.steps)]


def batch_tokens(batch: list) -> int:
    from finetune_studio.engine.datasets.render import TokenizedPair

    if isinstance(batch[0], TokenizedPair):
        return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in batch)
    return sum(len(t.input_ids) for t in batch)


class Memory:
    """Peak memory of this process: CUDA allocator, or resident set (sampled every 10 ms, plus ru_maxrss)."""

    def __init__(self, device: str):
        import psutil

        self.device, self.proc = device, psutil.Process()
        self.loaded = self.sampled = 0
        self._stop = threading.Event()
        self._thread = None

    def mark_loaded(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.loaded = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.loaded = self.sampled = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.sampled = max(self.sampled, self.proc.memory_info().rss)

    def finish(self, out: Outcome) -> None:
        import resource

        import torch

        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            out.peak_mem_bytes, out.peak_mem_above_model_bytes = peak, peak - self.loaded
        else:
            sampled = max(self.sampled, self.proc.memory_info().rss)
            # ru_maxrss is the kernel's high-water mark, which it updates lazily (and /proc/self/clear_refs resets):
            # it can read a little below a resident size sampled since
            out.peak_mem_bytes = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, sampled)
            out.peak_mem_above_model_bytes = sampled - self.loaded
        out.model_mem_bytes = self.loaded


def _scratch() -> str:
    """The worker's temporary studio home (created when missing), for TRL's output folder."""
    home = os.environ.get("FINETUNE_STUDIO_HOME") or tempfile.gettempdir()
    os.makedirs(home, exist_ok=True)
    return home


def process_age() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


# --- the two workers ------------------------------------------------------------------------------------------


def studio_worker(spec: Spec) -> Outcome:
    import torch

    from finetune_studio.core.protocol import events as ev
    from finetune_studio.engine.models import load_tokenizer
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    out = Outcome(spec.impl, spec.method, spec.objective)
    mem = Memory(spec.device)
    marks: list[tuple[float, float]] = []

    def on_event(e) -> None:
        if isinstance(e, ev.Started):
            mem.mark_loaded()
            marks.append((time.perf_counter(), time.process_time()))
        elif isinstance(e, ev.Step):
            marks.append((time.perf_counter(), time.process_time()))
            out.losses.append(e.loss)
            if e.step == 1:
                out.first_step_s = process_age()
        elif isinstance(e, ev.Log) and e.message.startswith("bf16-mixed"):
            out.compute = "bf16-mixed"

    train_run(engine_config(spec), reporter=Reporter(extra=on_event))
    mem.finish(out)
    # Counted after the run, so that this second tokenization of the data stays out of the timings.
    out.step_tokens = [batch_tokens(b) for b in data_stream(spec, load_tokenizer(spec.model))]
    out.step_seconds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    out.step_cpu_seconds = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out.threads = torch.get_num_threads()
    return out


def baseline_worker(spec: Spec) -> Outcome:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from transformers.utils import logging as hf_logging

    from finetune_studio.engine.datasets.render import IGNORE

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec.threads)
    out = Outcome(spec.impl, spec.method, spec.objective)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stream = data_stream(spec, tokenizer)
    out.step_tokens = [batch_tokens(b) for b in stream]
    rows = [ex for batch in stream for ex in batch]

    dtype = torch.float32 if spec.device == "cpu" else torch.bfloat16
    kwargs: dict = {"dtype": dtype}
    if spec.method in ("qlora", "qdora"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": spec.device if spec.device != "cuda" else 0}
    model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs)
    if "device_map" not in kwargs:
        model.to(spec.device)
    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=2 * spec.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        use_dora=spec.method in ("dora", "qdora"),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)  # as the engine's recipe, just before the adapters: the same LoRA A initialisation
    model = get_peft_model(model, lora)
    mem = Memory(spec.device)
    mem.mark_loaded()
    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))
            if state.global_step == 1:
                out.first_step_s = process_age()

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-", dir=_scratch()),
        per_device_train_batch_size=spec.batch_size,
        max_steps=spec.steps,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        max_length=spec.max_length,
        gradient_checkpointing=False,  # TRL's default is on; the engine's is off
        bf16=dtype == torch.bfloat16,  # TRL's default is on; the engine computes in float32 on the CPU
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the dataset is already in the engine's order
        use_cpu=spec.device == "cpu",
    )

    def recording(cls):
        class Recording(cls):
            def compute_loss(self, model, inputs, *args, **kw):
                result = super().compute_loss(model, inputs, *args, **kw)
                loss = result[0] if isinstance(result, tuple) else result
                if model.training:
                    out.losses.append(loss.detach().float().item())
                return result

            def _prepare_dataset(self, dataset, *args, **kw):  # DPO: rows are already tokenized
                if "prompt_ids" in dataset.column_names:
                    return dataset
                return super()._prepare_dataset(dataset, *args, **kw)

        return Recording

    if spec.objective == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(
            [{"input_ids": list(t.input_ids), "assistant_masks": [int(x != IGNORE) for x in t.labels]} for t in rows]
        )
        trainer = recording(SFTTrainer)(
            model=model,
            args=SFTConfig(**common),  # assistant-only loss: the assistant_masks column (see the docstring)
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    else:
        from trl import DPOConfig, DPOTrainer

        def pair_row(p):
            n = sum(1 for x in p.chosen.labels if x == IGNORE)  # the shared prompt
            chosen, rejected = list(p.chosen.input_ids), list(p.rejected.input_ids)  # the engine keeps array('i')
            assert chosen[:n] == rejected[:n]
            return {"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}

        trainer = recording(DPOTrainer)(
            model=model,
            ref_model=None,
            args=DPOConfig(**common),
            train_dataset=Dataset.from_list([pair_row(p) for p in rows]),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    trainer.train()
    mem.finish(out)
    out.step_seconds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    out.step_cpu_seconds = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out.threads = torch.get_num_threads()
    return out


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
