"""One training run, top to bottom: set up, train, checkpoint, clean up.

``train_run(config)`` is the whole recipe; ``python -m finetune_studio.engine train`` calls it in its own process,
the demo and the tests call it in-process. Every event goes through a :class:`~engine.train.reporting.Reporter` (stdout,
``events.jsonl`` and the SQLite store).

:meth:`Recipe.setup` makes everything the loop needs once and returns it as a frozen :class:`SetUp`;
:meth:`Recipe.train` runs the steps. What the loss is comes from the config's objective
(:mod:`engine.train.objectives`); who trains comes from the world (:mod:`engine.train.distributed.ranks`): one
process is a world of size one, so the loop has one path for one process and for several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from finetune_studio.core import methods as methods_table
from finetune_studio.core import paths
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.protocol import events as ev
from finetune_studio.core.protocol.memory_report import MemoryReport
from finetune_studio.core.run_status import RunStatus, is_resumable, resume_refusal
from finetune_studio.core.store import Store, new_run_id, process_start
from finetune_studio.engine import checkpoint
from finetune_studio.engine.datasets import load_dataset, pairs
from finetune_studio.engine.datasets.render import TokenizedPair
from finetune_studio.engine.datasets.split import split_by_prompt
from finetune_studio.engine.models import (
    LoadOptions,
    compute_dtype,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from finetune_studio.engine.train import adapters, errors, guard, init_adapter, memory_budget, objectives, prune
from finetune_studio.engine.train import eval_samples as samples
from finetune_studio.engine.train.batches import Batch, Sampler, layout, make_batch
from finetune_studio.engine.train.distributed import checkpoint as dist_checkpoint
from finetune_studio.engine.train.distributed.ranks import OneProcess, QuietStore, World, WrappedLogps
from finetune_studio.engine.train.early_stopping import EarlyStopping
from finetune_studio.engine.train.forward import TokenLogps, takes_packed_rows
from finetune_studio.engine.train.methods import lora as lora_methods
from finetune_studio.engine.train.model_patches import fused_ops as patching
from finetune_studio.engine.train.model_patches import kernel_wiring, mixed_precision
from finetune_studio.engine.train.objectives import Objective, TrainedModel
from finetune_studio.engine.train.reporting import Reporter
from finetune_studio.engine.train.threads import apply_threads

log = logging.getLogger(__name__)

INITIAL_ADAPTER = "initial-adapter"  # PiSSA / OLoRA: the adapter as initialised, to convert the final one against


class StopFlag:
    """Set by SIGTERM / SIGINT (or a test); checked after every optimizer step, and during set-up between stages
    and for every example tokenised."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_args) -> None:
        self.requested = True


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: RunStatus  # completed | stopped | failed
    step: int
    adapter_dir: Path | None = None
    final_loss: float | None = None
    message: str = ""


class SetupStopped(Exception):
    """Stop was asked for before training began: nothing to checkpoint, the run ends ``stopped`` at once."""


class TrainingFailed(RuntimeError):
    def __init__(self, result: RunResult):
        super().__init__(result.message)
        self.result = result


def train_run(
    config: TrainConfig | None = None,
    *,
    resume: str | None = None,
    reporter: Reporter | None = None,
    stop: StopFlag | None = None,
    ranks: World | None = None,
) -> RunResult:
    """Train a new run from ``config``, or continue run ``resume`` (id, id prefix or run folder).

    ``ranks`` (an :class:`engine.train.distributed.ranks.Ranks`): this process is one rank of a run on several;
    rank 0 finds or creates the run and tells the others, and only rank 0 writes the store. A rank's failure goes
    to torchelastic's error file; the launcher (``engine.train.distributed.launch``) reports it. Without it, the
    run is this process alone (:class:`~engine.train.distributed.ranks.OneProcess`).
    """
    world: World = ranks if ranks is not None else OneProcess()
    reporter = reporter or Reporter()
    stop = stop or StopFlag()
    memory_budget.fix_malloc_threshold()  # CPU memory is then what the tensors need (see its docstring)
    memory_budget.bound_onednn_caches()  # before any bf16 product: the per-shape caches stay small (see it)
    main = world.is_main
    # QuietStore stands in for the store on the other ranks (the writes Recipe makes; the reads are rank 0's)
    store = Store() if main else cast(Store, QuietStore())
    run_id: str | None = None  # other ranks learn them from rank 0
    run_dir: Path | None = None
    if main and resume:
        run = store.find_run(resume)
        if run is None:
            raise ConfigError("resume", f"no run named {resume!r}; give a run id from the runs list or a run folder")
        if not is_resumable(run["status"]):
            held = f" (process {run['pid']})" if run["status"] == RunStatus.RUNNING else ""
            raise ConfigError("resume", f"run {run['id']} cannot be resumed: {resume_refusal(run['status'])}{held}")
        run_id, run_dir = run["id"], Path(run["run_dir"])
        config = TrainConfig.from_dict(json.loads(run["config"]))
    elif main:
        assert config is not None
        run_id = new_run_id()
        run_dir = paths.runs_dir() / run_id
        run_dir.mkdir(parents=True, mode=paths.PRIVATE_DIR)  # its owner's alone, as the data home
        paths.atomic_write_text(run_dir / "config.json", config.to_json())
        # recorded relative to the data home (runs/<id>): a copied or moved home still finds the run's folder
        store.create_run(
            config.to_dict(), run_id=run_id, run_dir=paths.stored_run_dir(run_dir), name=config.display_name
        )
    if main:
        assert run_id is not None and run_dir is not None
        reporter.attach_run(store, run_id, run_dir)
        for leftover in checkpoint.clean_leftovers(run_dir):
            reporter.log(f"Removed {leftover.name}, left half-written by a process that was killed")
        pid = world.run_pid()
        store.update_run(
            run_id,
            status=RunStatus.RUNNING,
            pid=pid,
            pid_start=process_start(pid),
            started_at=time.time(),  # this session's start (a resumed run's Duration adds its sessions' steps)
            finished_at=None,  # a resumed run is not finished until it ends again
            error="",
            error_kind="",
        )
        world.announce_run(run_id, str(run_dir))
    run_id, run_dir, config = world.broadcast((run_id, run_dir, config))
    assert config is not None and run_id is not None and run_dir is not None
    world.parallelism = config.parallelism
    recipe = Recipe(config, run_id, run_dir, store, reporter, stop, world)
    try:
        return recipe.run(resume=bool(resume))
    except SetupStopped:
        return recipe.stopped_in_setup()
    except BaseException as exc:
        kind, message = errors.classify(exc, config, recipe.step)
        log.exception("run %s failed", run_id)
        if world.hand_failure_to_launcher(kind, message, exc, recipe.step):  # it names the rank that failed first
            raise TrainingFailed(RunResult(run_id, run_dir, RunStatus.FAILED, recipe.step, message=message)) from exc
        with contextlib.suppress(Exception):
            recipe.record_peak()
        try:
            store.update_run(run_id, status=RunStatus.FAILED, error=message, error_kind=kind, finished_at=time.time())
        except sqlite3.DatabaseError:  # the database itself is what failed: the event still says why
            log.exception("could not record the failure of run %s in the database", run_id)
        reporter.emit(ev.Failed(message=message, kind=kind, run_id=run_id, detail=f"{type(exc).__name__}: {exc}"))
        result = RunResult(run_id, run_dir, RunStatus.FAILED, recipe.step, message=message)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TrainingFailed(result) from exc
    finally:
        reporter.close()
        store.close()


@dataclass(frozen=True)
class Data:
    """The run's examples, tokenised and compact, and what set-up learnt reading them."""

    train: list
    validation: list
    sample_prompts: list  # (shown, rendered) prompts answered at every evaluation
    snapshot_id: str = ""  # the preference-store snapshot trained on (dataset: pairs:...)


@dataclass(frozen=True)
class SetUp:
    """Everything :meth:`Recipe.setup` makes, made once: what the steps train with."""

    device: str
    dtype: torch.dtype
    tokenizer: Any
    data: Data
    memory_report: MemoryReport | None
    start: init_adapter.StartingAdapter | None  # the adapter the run started from (init_adapter)
    model: Any  # the PEFT model
    forward: torch.nn.Module  # the training forward (LogpsModule), wrapped by DDP or FSDP on several processes
    logps: Callable[[Batch], TokenLogps]  # calls ``forward`` with a batch
    packing: bool  # the batches are packed rows (config.packing, where the model takes them)
    objective: Objective
    params: list  # the trainable parameters
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None  # float16 on CUDA
    total_steps: int
    sampler: Sampler  # the data order; its position moves as the steps consume examples

    def autocast(self):
        return autocast(self.device, self.dtype)

    def batch(self, examples: list, indices: list[int]) -> Batch:
        """``examples[indices]`` as one batch on the device."""
        return make_batch(examples, indices, self.tokenizer.pad_token_id, self.packing).to(self.device)


class Recipe:
    """One run: :meth:`setup`, then :meth:`train`; ``step`` and the early-stopping record are its progress."""

    def __init__(
        self,
        config: TrainConfig,
        run_id: str,
        run_dir: Path,
        store: Store,
        reporter: Reporter,
        stop: StopFlag,
        world: World | None = None,
    ):
        self.config, self.run_id, self.run_dir = config, run_id, run_dir
        self.store, self.reporter, self.stop = store, reporter, stop
        self.world: World = world if world is not None else OneProcess()
        self.device = pick_device()
        self.step = 0
        self.early = EarlyStopping(config.early_stopping_patience, run_dir)

    def run(self, resume: bool) -> RunResult:
        return self.train(self.setup(resume))

    # --- set-up -------------------------------------------------------------
    def setup(self, resume: bool) -> SetUp:
        cfg, world, device = self.config, self.world, self.device
        memory_budget.note_runtime_baseline()  # nothing loaded yet: the process baseline every estimate uses
        torch.manual_seed(cfg.seed)
        apply_threads(cfg.num_threads)
        options = LoadOptions(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
        dtype = compute_dtype(cfg.compute_dtype, device)
        if cfg.quantized and device == "mps":
            raise errors.DataError("4-bit NF4 (QLoRA / QDoRA) needs a CUDA GPU or the CPU; choose LoRA or DoRA")
        if cfg.lora_init == "loftq" and device != "cuda" and not cfg.init_adapter:
            raise ConfigError(
                "lora_init", "LoftQ's initialisation (PEFT's) runs on a CUDA GPU: use the default init here"
            )
        world.check_shardable(cfg, device, dtype)
        objective_class = objectives.objective_class(cfg.objective)
        start = None
        if cfg.init_adapter:
            start = init_adapter.resolve(cfg.init_adapter, self.store)
            self.store.update_run(self.run_id, parent_run_id=start.parent_run_id, init_adapter=str(start.path))
        folder = resolve_model(cfg.model, options, progress=self.reporter.progress)
        self._stop_point()
        if cfg.objective == "distill" and cfg.distill_student_layers:  # the student: the model pruned to N layers
            folder = self._student(folder, options)
            self._stop_point()
        guard.check_rank(cfg, folder)
        tokenizer = load_tokenizer(str(folder), options)
        data = self.prepare_data(tokenizer)
        memory_report = memory_budget.run_report(
            folder,
            cfg,
            world.device_share(memory_budget.device_info(device)),  # free memory before the weights are loaded
            data.train,
            trust_remote_code=cfg.trust_remote_code,
            world_size=world.world_size,  # then per process
        )
        verdict = guard.check_fit(memory_report, cfg)  # refuses a run that cannot fit, before loading it
        if verdict:
            self.reporter.log(f"Memory: {verdict}")
        self._stop_point()

        model, packing = self._load_model(folder, dtype, options, start, objective_class.needs_reference)
        self._stop_point()
        self._check_world_size()
        forward = world.wrap(model, dtype, device, cfg.kernels)
        logps = WrappedLogps(forward)
        objective = objective_class(
            TrainedModel(
                model,
                logps,
                cfg,
                device,
                functools.partial(autocast, device, dtype),
                start,
                tokenizer=tokenizer,
                layout=functools.partial(layout, pad_id=tokenizer.pad_token_id, packed=packing),
                model_folder=folder,
            )
        )
        # the adapter's trainable parameters, then those of the objective's own modules (a reward model's head)
        params = [p for p in forward.parameters() if p.requires_grad]
        params += [p for m in objective.extra_modules().values() for p in m.parameters() if p.requires_grad]
        optimizer = adapters.make_optimizer(params, cfg, device, model)
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        n = len(data.train)
        total_steps = math.ceil(cfg.num_epochs * n / per_step) if cfg.num_epochs > 0 else cfg.max_steps
        scheduler = adapters.make_scheduler(optimizer, cfg, total_steps)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device == "cuda" else None
        consumed, first = 0, None
        if resume:
            consumed, first = self._resume(model, forward, optimizer, scheduler, scaler, objective)
        if first is None:  # a new run (a resumed one keeps its checkpoint's order: free memory may differ now)
            first = self._longest_first(data.train, memory_report, packing)
        setup = SetUp(
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            data=data,
            memory_report=memory_report,
            start=start,
            model=model,
            forward=forward,
            logps=logps,
            packing=packing,
            objective=objective,
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            total_steps=total_steps,
            sampler=Sampler(n, cfg.batch_size, cfg.seed, consumed, first),
        )
        objective.prepare(data.train, functools.partial(setup.batch, data.train), self.reporter.progress)
        objective.prepare_eval(data.validation)
        self.early.criterion = objective.best_metric
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return setup

    def _load_model(
        self, folder: Path, dtype: torch.dtype, options: LoadOptions, start, with_reference: bool
    ) -> tuple[Any, bool]:
        """The base with this run's adapters (fresh, or the starting one), patched; and whether it trains on
        packed rows."""
        cfg, device = self.config, self.device
        self.reporter.progress("load", 0, 1, "Loading the model")
        full = methods_table.method(cfg.method).family == "full"  # trained weights: float32 (CUDA: autocast)
        if full and device != "cuda" and dtype != torch.float32:
            self.reporter.log(f"Full fine-tune on {device}: float32 throughout (a 16-bit compute dtype is CUDA's)")
        base = load_causal_lm(
            folder,
            dtype=torch.float32 if full else dtype,
            device=device,
            quantize_4bit=cfg.quantized,
            options=options,
            shardable=self.world.shards,
        )
        if start:
            self.reporter.log(init_adapter.describe(start))
            model = init_adapter.load(base, start, cfg, with_reference=with_reference)
        else:
            torch.manual_seed(cfg.seed)  # the adapters' initialisation depends on the seed alone
            model = adapters.add_adapters(base, cfg)
            initial = self.run_dir / INITIAL_ADAPTER
            if lora_methods.converts_on_save(cfg) and not initial.exists():  # PiSSA / OLoRA: the start, for the end
                tmp = checkpoint.private_temp_dir(self.run_dir, ".adapter-tmp-")
                checkpoint.save_adapter(model, tmp)
                os.replace(tmp, initial)
        patching.apply_memory_patches(model, cfg.fused_ops)  # Llama-family: ops that save less for backward
        packing = cfg.packing and takes_packed_rows(model)
        if packing:  # packed rows' attention sequence by sequence on the CPU (not a block-diagonal mask)
            patching.apply_packed_attention(model)
        elif cfg.packing:
            self.reporter.log(
                f"packing: {type(base).__name__} does not take packed rows (position ids that restart per "
                "sequence); its batches are padded",
                "warning",
            )
        if not full and mixed_precision.uses_mixed(cfg.compute_dtype, device, self.world.world_size > 1):
            self.reporter.log(f"bf16-mixed: {mixed_precision.apply_mixed(model)} frozen linears multiply in bf16")
        for note in kernel_wiring.install_kernels(model, cfg.kernels, device, cfg.fused_ops):
            self.reporter.log(note)
        return model, packing

    def _student(self, folder: Path, options: LoadOptions) -> Path:
        """``distill_student_layers``: the model pruned to that many layers in ``<run_dir>/student``, made once (a
        resumed run reuses it)."""
        cfg = self.config
        student, pruned = prune.run_student(folder, cfg, self.run_dir, options, self.reporter.progress)
        if pruned is None:
            self.reporter.log(f"The student: {student}, pruned when this run started")
        else:
            self.reporter.log(
                f"The student: {folder.name} pruned to {len(pruned.kept_layers)} of {pruned.num_layers_before} "
                f"layers (kept {pruned.kept_layers}; {pruned.params_after:,} of {pruned.params_before:,} "
                f"parameters), chosen on the training data, in {student}"
            )
        return student

    def _check_world_size(self) -> None:
        cfg, n = self.config, self.world.world_size
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        if per_step % n:
            raise ConfigError(
                "batch_size",
                f"the global batch (batch_size x gradient_accumulation_steps = {per_step}) must split evenly over "
                f"{n} processes: choose a multiple of {n}",
            )

    def _resume(self, model, forward, optimizer, scheduler, scaler, objective: Objective) -> tuple[int, list | None]:
        """Load the latest checkpoint, if any: the step, early stopping's record, and (examples consumed, the
        examples put first) for the sampler."""
        ckpt = checkpoint.latest_checkpoint(self.run_dir)
        if ckpt is None:
            self.reporter.log("No checkpoint yet: starting this run from step 0", "warning")
            return 0, None
        state = self._load_checkpoint(ckpt, model, forward, optimizer, scheduler, scaler)
        objective.load_state(ckpt)
        self.step = state.step
        self.early.restore(state)
        self.store.delete_metrics_after(self.run_id, self.step)
        self.reporter.log(f"Resumed from {ckpt.name}")
        return state.consumed, state.first_batch

    def _load_checkpoint(self, ckpt: Path, model, forward, optimizer, scheduler, scaler) -> checkpoint.TrainerState:
        """A distributed (DCP) checkpoint, by any number of processes, or a one-process checkpoint."""
        if dist_checkpoint.is_distributed(ckpt):
            return dist_checkpoint.load_checkpoint(ckpt, forward, optimizer, scheduler, self.world.rank, scaler)
        if self.world.shards:
            raise ConfigError(
                "parallelism", f"{ckpt.name} was saved by one process: resume it with parallelism ddp or one process"
            )
        return checkpoint.load_checkpoint(ckpt, model, optimizer, scheduler, scaler)

    def _longest_first(self, examples: list, report: MemoryReport | None, packing: bool) -> list[int]:
        """The longest batch's examples when they go first: 'on', or 'auto' when the estimate is within 15% of
        the device's free memory (or over it)."""
        cfg = self.config
        wanted = cfg.longest_batch_first == "on" or (
            cfg.longest_batch_first == "auto" and report is not None and report.tight
        )
        if not wanted:
            return []
        first = memory_budget.longest_batch(examples, cfg.batch_size, packing)
        self.reporter.log(f"Training on the longest batch first (examples {first}), so memory is tested at step 1")
        return first

    def _stop_point(self) -> None:
        # Several processes stop together at a training step (the stop flag is agreed there); alone, at once.
        if self.world.stopping(self.stop.requested):
            raise SetupStopped

    def stopped_in_setup(self) -> RunResult:
        """Stop asked for during set-up: the run ends ``stopped`` where its last checkpoint left it."""
        run = self.store.get_run(self.run_id)
        step = run.step if run else 0
        self.reporter.log("Stopped during set-up, before any training step")
        self.store.update_run(self.run_id, status=RunStatus.STOPPED, finished_at=time.time())
        self.reporter.emit(ev.Finished(run_id=self.run_id, status=RunStatus.STOPPED, step=step, final_loss=None))
        return RunResult(self.run_id, self.run_dir, RunStatus.STOPPED, step)

    def prepare_data(self, tokenizer) -> Data:
        """The dataset read, checked against the objective, split and tokenised (examples with nothing to train
        on dropped)."""
        cfg = self.config
        self.reporter.progress("data", 0, 1, f"Reading {Path(cfg.dataset).name}")
        if not cfg.dataset:
            raise errors.DataError("no dataset given: set 'dataset' to a data file")
        snapshot_id = ""
        if pairs.is_store_dataset(cfg.dataset):
            run = self.store.get_run(self.run_id)
            recorded = run.pairs_snapshot if run else ""  # a resumed run keeps its data
            data, snap = pairs.load_snapshot(self.store.preferences, recorded or cfg.dataset)
            snapshot_id = snap.id
            self.store.update_run(self.run_id, pairs_snapshot=snap.id)
            self.reporter.log(
                f"Training on {len(data.examples)} pairs of the preference store, snapshot {snap.id}"
                + pairs.left_out_note(snap.left_out, "; ")
            )
        else:
            data = load_dataset(cfg.dataset, cfg.dataset_mapping or None, max_length=cfg.max_length)
        for problem in data.problems[:20]:
            self.reporter.log(
                f"{Path(problem.file).name or 'data'}{f':{problem.line}' if problem.line else ''}: {problem.message}",
                "warning",
            )
        objective_class = objectives.objective_class(cfg.objective)
        wanted = objective_class.data_kinds
        if data.kind not in wanted:
            raise errors.DataError(
                f"{Path(cfg.dataset).name} holds {data.kind} data ({data.format}), but the {cfg.objective.upper()} "
                f"objective needs {' or '.join(wanted)} data: choose "
                f"{'DPO' if data.kind == 'preference' else 'SFT'} or another dataset"
            )
        train, val = split_by_prompt(data.examples, cfg.validation_fraction, cfg.seed)
        val = val[: cfg.max_eval_examples]
        sample_prompts = samples.pick_prompts(tokenizer, val, cfg.sample_prompts) if cfg.sample_prompts else []
        out = []
        for part_name, part in (("train", train), ("validation", val)):
            tokenized, dropped = [], 0
            for i, example in enumerate(part):
                self._stop_point()
                if i % 200 == 0:
                    self.reporter.progress("tokenize", i, len(part), f"Tokenizing the {part_name} split")
                item = objective_class.tokenize(tokenizer, example, cfg)
                if isinstance(item, TokenizedPair):
                    unusable = (
                        item.difference_truncated
                        or item.chosen.input_ids == item.rejected.input_ids
                        or not item.chosen.trained_tokens
                        or not item.rejected.trained_tokens
                    )
                else:
                    unusable = item.trained_tokens == 0
                if unusable:
                    dropped += 1
                    continue
                tokenized.append(_compact(item))
            if dropped:
                self.reporter.log(
                    f"Dropped {dropped} of {len(part)} {part_name} examples with nothing to train on "
                    f"within max_length={cfg.max_length} (or identical chosen/rejected)",
                    "warning",
                )
            out.append(tokenized)
        if not out[0]:
            raise errors.DataError(
                f"no usable training examples in {Path(cfg.dataset).name} "
                f"(after the split and max_length={cfg.max_length})"
            )
        return Data(out[0], out[1], sample_prompts, snapshot_id)

    # --- the loop -----------------------------------------------------------
    def train(self, s: SetUp) -> RunResult:
        memory_budget.reuse_memory_between_steps()  # the steps' temporaries reuse the heap (see its docstring)
        cfg = self.config
        trainable, total = adapters.parameter_counts(s.model)
        self.reporter.emit(
            ev.Started(
                run_id=self.run_id,
                run_dir=str(self.run_dir),
                total_steps=s.total_steps,
                device=s.device,
                resumed_from_step=self.step,
                trainable_params=trainable,
                total_params=total,
                memory_budget_bytes=s.memory_report.total_bytes if s.memory_report else 0,
                memory_total_bytes=_device_total_memory(s.device),
                world_size=self.world.world_size,
                parent_run_id=s.start.parent_run_id if s.start else "",
                pairs_snapshot=s.data.snapshot_id,
            )
        )
        self.store.update_run(self.run_id, total_steps=s.total_steps, device=s.device)
        if s.memory_report is not None:
            budget = s.memory_report
            self.reporter.log(f"Memory budget {budget.total_bytes / 2**30:.2f} GiB; {budget.lengths.description}")
            self.store.update_run(self.run_id, memory_budget_bytes=budget.total_bytes, memory_estimate=budget.to_json())
        started = time.perf_counter()
        last_loss = None
        s.model.train()
        while self.step < s.total_steps:
            t0 = time.perf_counter()
            batches, denom = self._step_batches(s)
            totals: dict[str, float] = {}
            for i, batch in enumerate(batches):
                with _sync(s.forward, last=i == len(batches) - 1):
                    for key, value in self._micro_step(s, batch.to(s.device), denom).items():
                        totals[key] = totals.get(key, 0.0) + value
            # one all-reduce: the metrics, and a stop that every rank obeys at once
            keys = sorted(totals)
            tokens = sum(b.tokens for b in batches)
            summed = self.world.sum([totals[k] for k in keys] + [tokens, float(self.stop.requested)])
            totals, tokens, agreed_stop = dict(zip(keys, summed)), int(summed[-2]), summed[-1] > 0
            if s.scaler:
                s.scaler.unscale_(s.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm or float("inf"))
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
            lr = s.scheduler.get_last_lr()[0]
            if s.scaler:
                s.scaler.step(s.optimizer)
                s.scaler.update()
            else:
                s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            last_loss = totals.pop("loss")
            if not math.isfinite(last_loss):
                raise errors.DataError(
                    f"the loss became {last_loss} at step {self.step}: lower learning_rate "
                    f"(now {cfg.learning_rate:g}) or set max_grad_norm"
                )
            used, peak = _memory(s.device)
            step_event = ev.Step(
                step=self.step,
                total_steps=s.total_steps,
                loss=last_loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9),
                memory_used_bytes=used,
                memory_peak_bytes=peak,
                epoch=s.sampler.epoch,
                elapsed_s=time.perf_counter() - started,
                **_event_fields(ev.Step, s.objective.step_metrics(totals, denom)),
            )
            self.reporter.emit(step_event)
            for event in s.objective.step_events(self.step):  # the objective's own (an RL step's sampled answers)
                self.reporter.emit(event)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < s.total_steps:
                self.evaluate(s)
                if self.early.spent:
                    return self._finish(
                        s, RunStatus.COMPLETED, last_loss, note=self.early.note(self.step), stopped_early=True
                    )
            if self.world.stopping(self.stop.requested, agreed_stop):
                path = self.save_checkpoint(s)
                return self._finish(
                    s, RunStatus.STOPPED, last_loss, note=f"Stopped at step {self.step}; resume from {path.name}"
                )
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < s.total_steps:
                self.save_checkpoint(s)
        if s.data.validation:
            self.evaluate(s)
        return self._finish(s, RunStatus.COMPLETED, last_loss)

    def _step_batches(self, s: SetUp) -> tuple[list[Batch], int]:
        """The micro-batches this process trains in one optimizer step, and the whole step's loss denominator
        (the objective's: trained tokens, pairs, ...), summed over every process."""
        cfg, pad = self.config, s.tokenizer.pad_token_id

        def next_groups() -> list[list[int]]:
            groups = [s.sampler.next_indices() for _ in range(cfg.gradient_accumulation_steps)]
            # the same global batch on every process, this one's share of it (alone: all of it), in micro-batches
            flat = [i for g in groups for i in g]
            mine = flat[self.world.share(len(flat))]
            return [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]

        # the objective's micro-batches: by default the next examples'; its own (sampled answers) where it makes them
        batches = s.objective.step_batches(next_groups, lambda g: make_batch(s.data.train, g, pad, s.packing))
        denom = int(self.world.sum([sum(s.objective.denominator(b) for b in batches)])[0])
        return batches, denom

    def _micro_step(self, s: SetUp, batch: Batch, denom: int) -> dict[str, float]:
        return micro_step(s, batch, denom, self.world.world_size)

    @torch.no_grad()
    def evaluate(self, s: SetUp) -> None:
        """The eval loss (and, with early stopping, the best so far), then what the model answers now."""
        s.model.eval()
        val, bs = s.data.validation, self.config.batch_size
        sums: dict[str, float] = {}
        for start in range(0, len(val), bs):
            batch = s.batch(val, list(range(start, min(start + bs, len(val)))))
            with s.autocast():
                for key, value in s.objective.eval_sums(batch).items():
                    sums[key] = sums.get(key, 0.0) + value
        if sums.get("count"):
            eval_loss = sums["loss"] / sums["count"]
            figures = s.objective.eval_metrics(sums)
            extra: dict[str, Any] = _event_fields(ev.Eval, figures)
            if self.early.patience:
                chosen_by = s.objective.best_metric  # "": the eval loss; else a figure, the highest the best
                is_best = self.early.observe(
                    self.step,
                    eval_loss,
                    s.model,
                    functools.partial(s.objective.save_state, final=True),
                    score=-figures[chosen_by] if chosen_by else None,
                )
                if is_best:
                    self.store.update_run(
                        self.run_id,
                        best_step=self.step,
                        best_eval_loss=eval_loss,
                        best_checkpoint=paths.stored_run_dir(self.early.best_dir or ""),
                    )
                extra.update(best_eval_loss=self.early.best_eval_loss, best_step=self.early.best_step, is_best=is_best)
            self.reporter.emit(ev.Eval(step=self.step, eval_loss=eval_loss, **extra))
        if s.data.sample_prompts:
            shown, rendered = zip(*s.data.sample_prompts, strict=True)
            answers = samples.greedy_answers(
                s.model, s.tokenizer, list(rendered), self.config.sample_max_new_tokens, s.device
            )
            self.reporter.emit(ev.Sample(step=self.step, prompts=list(shown), answers=answers))
        s.model.train()

    # --- checkpoint and clean-up ------------------------------------------------
    def save_checkpoint(self, s: SetUp) -> Path:
        state = checkpoint.TrainerState(
            step=self.step,
            consumed=s.sampler.consumed,
            run_id=self.run_id,
            first_batch=s.sampler.first,
            **self.early.state(),
        )
        extra = functools.partial(s.objective.save_state, final=False)
        path = self.world.save_checkpoint(
            self.run_dir, s.forward, s.model, s.optimizer, s.scheduler, state, s.scaler, extra
        )
        self.reporter.emit(ev.CheckpointSaved(step=self.step, path=str(path)))
        return path

    def record_peak(self) -> None:
        """The run's measured peak beside its estimate: CUDA allocated and reserved, or the CPU resident peak."""
        peak = memory_budget.measured_peak(self.device)
        self.store.update_run(self.run_id, memory_peak_bytes=peak.allocated, memory_reserved_peak_bytes=peak.reserved)

    def _finish(
        self, s: SetUp, status: RunStatus, last_loss: float | None, note: str = "", stopped_early: bool = False
    ) -> RunResult:
        adapter_dir = None
        if status == RunStatus.COMPLETED:
            adapter_dir = self.run_dir / "adapter"
            weights = self.world.adapter_state(s.model)  # FSDP gathers the full weights (every rank calls)
            if self.world.is_main:
                tmp = checkpoint.private_temp_dir(self.run_dir, ".adapter-tmp-")
                # the trained adapter only (a DPO run's frozen 'reference' copy is not saved)
                if lora_methods.converts_on_save(self.config):  # as plain LoRA on the unchanged base (rank 2r)
                    s.model.save_pretrained(
                        tmp,
                        selected_adapters=["default"],
                        path_initial_model_for_weight_conversion=str(self.run_dir / INITIAL_ADAPTER),
                    )
                else:
                    checkpoint.save_adapter(s.model, tmp, state_dict=weights)
                s.objective.save_state(tmp, final=True)  # the objective's own files (a reward model's head)
                old = self.run_dir / f".adapter-old-{os.getpid()}"
                if adapter_dir.exists():  # moved aside, not deleted, until the new one is in place
                    os.replace(adapter_dir, old)
                os.replace(tmp, adapter_dir)
                if old.exists():
                    import shutil

                    shutil.rmtree(old)
                self._finish_events(s, adapter_dir)
        if note:
            self.reporter.log(note)
        self.record_peak()
        # The finished event (events.jsonl) before the store's status: a kill between the two leaves a run the store
        # reads as interrupted (resumable) with its events complete, never 'completed' with no finished event.
        self.reporter.emit(
            ev.Finished(
                run_id=self.run_id,
                status=status,
                step=self.step,
                final_loss=last_loss,
                adapter_dir=str(adapter_dir or ""),
                best_checkpoint=str(self.early.best_dir or ""),
                best_step=self.early.best_step if self.early.best_dir else None,
                stopped_early=stopped_early,
            )
        )
        self.store.update_run(
            self.run_id,
            status=status,
            finished_at=time.time(),
            step=self.step,
            final_loss=last_loss,
            adapter_dir=paths.stored_run_dir(adapter_dir) if adapter_dir else "",
        )
        return RunResult(self.run_id, self.run_dir, status, self.step, adapter_dir, last_loss)

    def _finish_events(self, s: SetUp, saved: Path) -> None:
        """The objective's own events at the end of a completed run (a distillation's generation speed); a failure
        there is logged, never the run's."""
        try:
            for event in s.objective.finish_events(saved, [*s.data.validation, *s.data.train]):
                self.reporter.emit(event)
        except Exception as exc:  # a measurement after training must not fail the trained run
            log.exception("the objective's final measurement failed")
            self.reporter.log(
                f"The final measurement failed ({type(exc).__name__}: {exc}); the run is complete", "warning"
            )


def micro_step(s: SetUp, batch: Batch, denom: int, world_size: int = 1) -> dict[str, float]:
    """Forward + backward of one micro-batch on one of ``world_size`` processes; returns its share of the step's loss
    and of the objective's metric sums."""
    with s.autocast():
        loss, stats = s.objective.loss(batch, denom)
    # DDP and FSDP average gradients over the N processes; each one's loss is its part of the whole sum
    back = loss * world_size
    (s.scaler.scale(back) if s.scaler else back).backward()
    return {**stats, "loss": loss.item()}


def autocast(device: str, dtype: torch.dtype):
    """CUDA autocast in the run's 16-bit dtype; nothing elsewhere (the CPU's bf16-mixed is in the weights)."""
    if device == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _sync(forward: torch.nn.Module, last: bool):
    """DDP: all-reduce gradients in the last micro-batch's backward only."""
    no_sync = getattr(forward, "no_sync", None)  # DDP has one; the unwrapped module has none
    return no_sync() if no_sync is not None and not last else contextlib.nullcontext()


def _event_fields(event: type[ev.Event], figures: dict[str, float]) -> dict[str, Any]:
    """An objective's figures as keyword arguments of ``event``: the fields it names (DPO's rewards), the others
    in its ``metrics``."""
    named = {f.name for f in dataclasses.fields(event)} - {"metrics"}
    fields: dict[str, Any] = {k: v for k, v in figures.items() if k in named}
    own = {k: v for k, v in figures.items() if k not in named}
    return {**fields, "metrics": own} if own else fields


def _compact(item):
    """Token ids and labels as int32 arrays (4 bytes a token instead of a Python int's ~36): what the run keeps of
    each example for its whole life, so a large dataset costs its tokens and little more."""
    from array import array
    from dataclasses import replace

    if isinstance(item, TokenizedPair):
        return replace(item, chosen=_compact(item.chosen), rejected=_compact(item.rejected))
    return replace(item, input_ids=array("i", item.input_ids), labels=array("i", item.labels))


def _memory(device: str) -> tuple[int, int]:
    """(in use, peak) bytes: CUDA allocator figures, or the process's resident memory on the CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    import resource

    rss = _this_process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, max(peak, rss)


@functools.cache
def _this_process():
    import psutil

    return psutil.Process()


def _device_total_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    import psutil

    return psutil.virtual_memory().total
