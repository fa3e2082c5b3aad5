"""The engine and TRL training the same steps: one side of a comparison per call, in the calling process.

``studio_worker`` runs ``engine.train.recipe.train_run`` itself (no eval, no checkpoints); ``baseline_worker`` runs
``transformers.AutoModelForCausalLM`` + ``peft.get_peft_model`` + TRL's ``SFTTrainer`` or ``DPOTrainer`` on the same
model, tokens, masks, LoRA settings, seed and example order (``benchmarks/train_bench.py``'s docstring says which of
TRL's defaults are changed and why). Each returns an :class:`Outcome`: the losses, the tokens and times of each step,
the peak memory. ``tests/engine/test_train_bench.py`` checks that the two sides agree step by step;
``benchmarks/train_bench.py`` runs each side in a process of its own and prints the speed and memory figures (it puts
this folder on its ``sys.path``). TRL is the ``bench`` extra in ``pyproject.toml``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = {"sft": ROOT / "resources/datasets/demo_sft.jsonl", "dpo": ROOT / "resources/datasets/demo_preference.jsonl"}


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
