"""One training run, top to bottom: set up, train, checkpoint, clean up.

``train_run(config)`` is the whole recipe; ``python -m finetune_studio.engine train`` calls it in its own process,
the demo and the tests call it in-process. Every event goes through a :class:`~engine.train.reporting.Reporter` (stdout,
``events.jsonl`` and the SQLite store).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from finetune_studio.core import paths
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.protocol import events as ev
from finetune_studio.core.run_status import RunStatus, is_resumable, resume_refusal
from finetune_studio.core.store import Store, new_run_id, process_start
from finetune_studio.engine import checkpoint
from finetune_studio.engine.datasets import load_dataset, pairs
from finetune_studio.engine.datasets.render import TokenizedPair, tokenize_example
from finetune_studio.engine.datasets.split import split_by_prompt
from finetune_studio.engine.models import (
    LoadOptions,
    compute_dtype,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from finetune_studio.engine.train import adapters, errors, guard, init_adapter, memory_budget
from finetune_studio.engine.train import eval_samples as samples
from finetune_studio.engine.train.batches import Sampler, make_batch
from finetune_studio.engine.train.distributed import checkpoint as dist_checkpoint
from finetune_studio.engine.train.early_stopping import EarlyStopping
from finetune_studio.engine.train.forward import LogprobModel, takes_packed_rows
from finetune_studio.engine.train.losses import dpo_loss, sequence_logps, sft_loss
from finetune_studio.engine.train.model_patches import fused_ops as patching
from finetune_studio.engine.train.model_patches import kernel_wiring, mixed_precision
from finetune_studio.engine.train.reporting import Reporter
from finetune_studio.engine.train.threads import apply_threads

if TYPE_CHECKING:
    from finetune_studio.engine.train.distributed.ranks import WrappedLogps

log = logging.getLogger(__name__)


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
    ranks=None,
) -> RunResult:
    """Train a new run from ``config``, or continue run ``resume`` (id, id prefix or run folder).

    ``ranks`` (an :class:`engine.train.distributed.ranks.Ranks`): this process is one rank of a run on several; rank 0
    finds
    or creates the run and tells the others, and only rank 0 writes the store. A rank's failure goes to
    torchelastic's error file; the launcher (``engine.train.distributed.launch``) reports it.
    """
    from finetune_studio.engine.train.distributed import ranks as distributed

    reporter = reporter or Reporter()
    stop = stop or StopFlag()
    memory_budget.fix_malloc_threshold()  # CPU memory is then what the tensors need (see its docstring)
    main = ranks is None or ranks.is_main
    # QuietStore stands in for the store on the other ranks (the writes Recipe makes; the reads are rank 0's)
    store = Store() if main else cast(Store, distributed.QuietStore())
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
        run_dir.mkdir(parents=True)
        paths.atomic_write_text(run_dir / "config.json", config.to_json())
        store.create_run(config.to_dict(), run_id=run_id, run_dir=str(run_dir), name=config.display_name)
    if main:
        assert run_id is not None and run_dir is not None
        reporter.attach_run(store, run_id, run_dir)
        for leftover in checkpoint.clean_leftovers(run_dir):
            reporter.log(f"Removed {leftover.name}, left half-written by a process that was killed")
        pid = int(os.environ.get(distributed.LAUNCHER_PID_ENV) or os.getpid()) if ranks else os.getpid()
        store.update_run(
            run_id,
            status=RunStatus.RUNNING,
            pid=pid,
            pid_start=process_start(pid),
            started_at=time.time(),
            error="",
            error_kind="",
        )
    if ranks is not None:
        if main:
            assert run_id is not None  # rank 0 found or created the run above
            distributed.write_launch_file(run_id, str(run_dir))
        run_id, run_dir, config = ranks.broadcast((run_id, run_dir, config))
        ranks.parallelism = config.parallelism
    assert config is not None and run_id is not None and run_dir is not None
    recipe = Recipe(config, run_id, run_dir, store, reporter, stop, ranks)
    try:
        return recipe.run(resume=bool(resume))
    except SetupStopped:
        return recipe.stopped_in_setup()
    except BaseException as exc:
        kind, message = errors.classify(exc, config, recipe.step)
        log.exception("run %s failed", run_id)
        if ranks is not None:  # the launcher names the rank that failed first and marks the run
            distributed.record_failure(ranks.rank, kind, message, exc, recipe.step)
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


class Recipe:
    def __init__(
        self,
        config: TrainConfig,
        run_id: str,
        run_dir: Path,
        store: Store,
        reporter: Reporter,
        stop: StopFlag,
        ranks=None,
    ):
        self.config, self.run_id, self.run_dir = config, run_id, run_dir
        self.store, self.reporter, self.stop = store, reporter, stop
        self.ranks = ranks  # None: one process
        self.main = ranks is None or ranks.is_main
        self.step = 0
        self.dpo = config.objective == "dpo"
        self.packing = False  # config.packing where the model takes packed rows (set up in setup)
        self.start: init_adapter.StartingAdapter | None = None
        self.snapshot_id = ""
        self.early = EarlyStopping(config.early_stopping_patience, run_dir)

    # --- set-up -------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.threads = apply_threads(cfg.num_threads)
        options = LoadOptions(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
        self.device = pick_device()
        self.dtype = compute_dtype(cfg.compute_dtype, self.device)
        if cfg.quantized and self.device == "mps":
            raise errors.DataError("4-bit NF4 (QLoRA / QDoRA) needs a CUDA GPU or the CPU; choose LoRA or DoRA")
        if self.ranks is not None:
            from finetune_studio.engine.train.distributed.ranks import check_shardable

            check_shardable(cfg, self.device, self.dtype)
        if cfg.init_adapter:
            self.start = init_adapter.resolve(cfg.init_adapter, self.store)
            self.store.update_run(
                self.run_id, parent_run_id=self.start.parent_run_id, init_adapter=str(self.start.path)
            )
        folder = resolve_model(cfg.model, options, progress=self.reporter.progress)
        self._stop_point()
        self.model_folder = folder
        guard.check_rank(cfg, folder)
        self.tokenizer = load_tokenizer(str(folder), options)
        self.train_examples, self.val_examples = self._prepare_data()
        device = memory_budget.device_info(self.device)  # free memory before the weights are loaded
        self.memory_report = memory_budget.run_report(
            folder,
            cfg,
            self.ranks.device_share(device) if self.ranks is not None else device,
            self.train_examples,
            trust_remote_code=cfg.trust_remote_code,
            world_size=self.ranks.world_size if self.ranks is not None else 1,  # then per process
        )
        verdict = guard.check_fit(self.memory_report, cfg)  # refuses a run that cannot fit, before loading it
        if verdict:
            self.reporter.log(f"Memory: {verdict}")
        self._stop_point()

        self.reporter.progress("load", 0, 1, "Loading the model")
        fsdp = self.ranks is not None and cfg.parallelism == "fsdp"
        base = load_causal_lm(
            folder, dtype=self.dtype, device=self.device, quantize_4bit=cfg.quantized, options=options, shardable=fsdp
        )
        if self.start:
            self.reporter.log(init_adapter.describe(self.start))
            self.model = init_adapter.load(base, self.start, cfg, with_reference=self.dpo)
        else:
            torch.manual_seed(cfg.seed)  # the adapters' initialisation depends on the seed alone
            self.model = adapters.add_adapters(base, cfg)
        patching.apply_memory_patches(self.model, cfg.fused_ops)  # Llama-family: ops that save less for backward
        self.packing = cfg.packing and takes_packed_rows(self.model)
        if self.packing:  # packed rows' attention sequence by sequence on the CPU (not a block-diagonal mask)
            patching.apply_packed_attention(self.model)
        elif cfg.packing:
            self.reporter.log(
                f"packing: {type(base).__name__} does not take packed rows (position ids that restart per "
                "sequence); its batches are padded",
                "warning",
            )
        if mixed_precision.uses_mixed(cfg.compute_dtype, self.device, self.ranks is not None):
            self.reporter.log(f"bf16-mixed: {mixed_precision.apply_mixed(self.model)} frozen linears multiply in bf16")
        for note in kernel_wiring.install_kernels(self.model, cfg.kernels, self.device, cfg.fused_ops):
            self.reporter.log(note)
        self._stop_point()
        self.module = None  # several processes: the DDP- or FSDP-wrapped training forward
        if self.ranks is not None:
            from finetune_studio.engine.train.distributed.ranks import WrappedLogps

            self._check_world_size()
            self.module = self.ranks.wrap(self.model, self.dtype, self.device, cfg.kernels)
            self.logps: LogprobModel | WrappedLogps = WrappedLogps(self.module)
        else:
            self.logps = LogprobModel(self.model, kernels=cfg.kernels)
        self.params = [p for p in (self.module or self.model).parameters() if p.requires_grad]
        self.optimizer = adapters.make_optimizer(self.params, cfg, self.device)
        n = len(self.train_examples)
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.total_steps = math.ceil(cfg.num_epochs * n / per_step) if cfg.num_epochs > 0 else cfg.max_steps
        self.scheduler = adapters.make_scheduler(self.optimizer, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and self.device == "cuda" else None
        consumed, first = 0, None
        if resume:
            ckpt = checkpoint.latest_checkpoint(self.run_dir)
            if ckpt is not None:
                state = self._load_checkpoint(ckpt)
                self.step, consumed, first = state.step, state.consumed, state.first_batch
                self.early.restore(state)
                self.store.delete_metrics_after(self.run_id, self.step)
                self.reporter.log(f"Resumed from {ckpt.name}")
            else:
                self.reporter.log("No checkpoint yet: starting this run from step 0", "warning")
        if first is None:  # a new run (a resumed one keeps its checkpoint's order: free memory may differ now)
            first = self._longest_first()
        self.sampler = Sampler(n, cfg.batch_size, cfg.seed, consumed, first)
        self.reference = self._precompute_reference() if self.dpo and cfg.precompute_reference else None
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _check_world_size(self) -> None:
        cfg, n = self.config, self.ranks.world_size
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        if per_step % n:
            raise ConfigError(
                "batch_size",
                f"the global batch (batch_size x gradient_accumulation_steps = {per_step}) must split evenly over "
                f"{n} processes: choose a multiple of {n}",
            )

    def _load_checkpoint(self, ckpt: Path) -> checkpoint.TrainerState:
        """A distributed (DCP) checkpoint, by any number of processes, or a one-process checkpoint."""
        if dist_checkpoint.is_distributed(ckpt):
            from finetune_studio.engine.train.distributed.ranks import LogpsModule

            module = self.module if self.module is not None else LogpsModule(self.model)
            rank = self.ranks.rank if self.ranks else 0
            return dist_checkpoint.load_checkpoint(ckpt, module, self.optimizer, self.scheduler, rank, self.scaler)
        if self.ranks is not None and self.ranks.parallelism == "fsdp":
            raise ConfigError(
                "parallelism", f"{ckpt.name} was saved by one process: resume it with parallelism ddp or one process"
            )
        return checkpoint.load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.scaler)

    def _step_batches(self) -> tuple[list, int]:
        """The micro-batches this process trains in one optimizer step, and the whole step's loss denominator
        (trained tokens for SFT, pairs for DPO, summed over every process)."""
        cfg, pad = self.config, self.tokenizer.pad_token_id
        groups = [self.sampler.next_indices() for _ in range(cfg.gradient_accumulation_steps)]
        if self.ranks is not None:  # the same global batch, this rank's share of it, in micro-batches
            flat = [i for g in groups for i in g]
            mine = flat[self.ranks.share(len(flat))]
            groups = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        batches = [make_batch(self.train_examples, g, pad, self.packing) for g in groups]
        denom = sum(b.pairs for b in batches) if self.dpo else sum(b.trained_tokens for b in batches)
        if self.ranks is not None:
            denom = int(self.ranks.sum([denom])[0])
        return batches, denom

    def _sync(self, last: bool):
        """DDP: all-reduce gradients in the last micro-batch's backward only."""
        if self.module is not None and not last and hasattr(self.module, "no_sync"):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _longest_first(self) -> list[int]:
        """The longest batch's examples when they go first: 'on', or 'auto' when the estimate is within 15% of
        the device's free memory (or over it)."""
        cfg, report = self.config, self.memory_report
        wanted = cfg.longest_batch_first == "on" or (
            cfg.longest_batch_first == "auto" and report is not None and report.tight
        )
        if not wanted:
            return []
        first = memory_budget.longest_batch(self.train_examples, cfg.batch_size, self.packing)
        self.reporter.log(f"Training on the longest batch first (examples {first}), so memory is tested at step 1")
        return first

    def _stop_point(self) -> None:
        # Several processes stop together at a training step (the stop flag is agreed there); alone, at once.
        if self.stop.requested and self.ranks is None:
            raise SetupStopped

    def stopped_in_setup(self) -> RunResult:
        """Stop asked for during set-up: the run ends ``stopped`` where its last checkpoint left it."""
        step = int((self.store.get_run(self.run_id) or {}).get("step") or 0)
        self.reporter.log("Stopped during set-up, before any training step")
        self.store.update_run(self.run_id, status=RunStatus.STOPPED, finished_at=time.time())
        self.reporter.emit(ev.Finished(run_id=self.run_id, status=RunStatus.STOPPED, step=step, final_loss=None))
        return RunResult(self.run_id, self.run_dir, RunStatus.STOPPED, step)

    def _prepare_data(self) -> tuple[list, list]:
        cfg = self.config
        self.reporter.progress("data", 0, 1, f"Reading {Path(cfg.dataset).name}")
        if not cfg.dataset:
            raise errors.DataError("no dataset given: set 'dataset' to a data file")
        if pairs.is_store_dataset(cfg.dataset):
            recorded = (self.store.get_run(self.run_id) or {}).get("pairs_snapshot")  # a resumed run keeps its data
            data, snap = pairs.load_snapshot(self.store.preferences, recorded or cfg.dataset)
            self.snapshot_id = snap.id
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
        wanted = ("preference",) if self.dpo else ("sft", "text")
        if data.kind not in wanted:
            raise errors.DataError(
                f"{Path(cfg.dataset).name} holds {data.kind} data ({data.format}), but the {cfg.objective.upper()} "
                f"objective needs {' or '.join(wanted)} data: choose "
                f"{'DPO' if data.kind == 'preference' else 'SFT'} or another dataset"
            )
        train, val = split_by_prompt(data.examples, cfg.validation_fraction, cfg.seed)
        val = val[: cfg.max_eval_examples]
        self.sample_prompts = (
            samples.pick_prompts(self.tokenizer, val, cfg.sample_prompts) if cfg.sample_prompts else []
        )
        out = []
        for part_name, part in (("train", train), ("validation", val)):
            tokenized, dropped = [], 0
            for i, example in enumerate(part):
                self._stop_point()
                if i % 200 == 0:
                    self.reporter.progress("tokenize", i, len(part), f"Tokenizing the {part_name} split")
                item = tokenize_example(self.tokenizer, example, cfg.max_length, cfg.loss_on)
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
        return out[0], out[1]

    # --- maths --------------------------------------------------------------
    def _autocast(self):
        if self.device == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _pair_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.logps(batch)
        seq = sequence_logps(out.logps, out.rows, out.batch, average=self.config.dpo_loss == "ipo")
        return seq[: batch.pairs], seq[batch.pairs :]

    def _reference_logps(self, batch, precomputed=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the reference: the starting adapter (init_adapter) or the bare base (adapters off);
        ``precomputed`` (chosen, rejected) indexed by training example."""
        if precomputed is not None:
            idx = torch.tensor(batch.indices)
            return precomputed[0][idx].to(self.device), precomputed[1][idx].to(self.device)
        reference = init_adapter.reference_adapter(self.model) if self.start else self.model.disable_adapter()
        with torch.no_grad(), reference, self._autocast():
            return self._pair_logps(batch)

    def _precompute_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, bs = len(self.train_examples), self.config.batch_size
        chosen, rejected = torch.zeros(n), torch.zeros(n)
        for start in range(0, n, bs):
            self.reporter.progress("reference", start, n, "Computing reference log-probs")
            idx = list(range(start, min(n, start + bs)))
            batch = make_batch(self.train_examples, idx, self.tokenizer.pad_token_id, self.packing).to(self.device)
            c, r = self._reference_logps(batch)
            chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
        return chosen, rejected

    def _dpo_terms(self, batch, precomputed=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair DPO losses and rewards; the reference pass runs first, so no policy graph is alive then."""
        ref_c, ref_r = self._reference_logps(batch, precomputed)
        pol_c, pol_r = self._pair_logps(batch)
        return dpo_loss(
            pol_c,
            pol_r,
            ref_c,
            ref_r,
            beta=self.config.dpo_beta,
            loss_type=self.config.dpo_loss,
            label_smoothing=self.config.dpo_label_smoothing,
        )

    def _micro_step(self, batch, denom: int) -> dict:
        """Forward + backward of one micro-batch; returns its share of the step's metrics."""
        with self._autocast():
            if not self.dpo:
                out = self.logps(batch)
                loss = sft_loss(out.logps, denom)
                stats = {}
            else:
                losses, rc, rr = self._dpo_terms(batch, self.reference)
                loss = losses.sum() / denom
                stats = {
                    "reward_chosen": rc.sum().item(),
                    "reward_rejected": rr.sum().item(),
                    "reward_accuracy": (rc > rr).float().sum().item(),
                }
        # DDP and FSDP average gradients over the N processes; each one's loss is its part of the whole sum
        back = loss * self.ranks.world_size if self.ranks is not None else loss
        (self.scaler.scale(back) if self.scaler else back).backward()
        stats["loss"] = loss.item()
        return stats

    # --- the loop -----------------------------------------------------------
    def run(self, resume: bool) -> RunResult:
        self.setup(resume)
        memory_budget.reuse_memory_between_steps()  # the steps' temporaries reuse the heap (see its docstring)
        cfg = self.config
        trainable, total = adapters.parameter_counts(self.model)
        self.reporter.emit(
            ev.Started(
                run_id=self.run_id,
                run_dir=str(self.run_dir),
                total_steps=self.total_steps,
                device=self.device,
                resumed_from_step=self.step,
                trainable_params=trainable,
                total_params=total,
                memory_budget_bytes=self.memory_report.total_bytes if self.memory_report else 0,
                memory_total_bytes=_device_total_memory(self.device),
                world_size=self.ranks.world_size if self.ranks else 1,
                parent_run_id=self.start.parent_run_id if self.start else "",
                pairs_snapshot=self.snapshot_id,
            )
        )
        self.store.update_run(self.run_id, total_steps=self.total_steps, device=self.device)
        if self.memory_report is not None:
            budget = self.memory_report
            self.reporter.log(f"Memory budget {budget.total_bytes / 2**30:.2f} GiB; {budget.lengths.description}")
            self.store.update_run(
                self.run_id,
                memory_budget_bytes=self.memory_report.total_bytes,
                memory_estimate=self.memory_report.to_json(),
            )
        started = time.perf_counter()
        last_loss = None
        self.model.train()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            batches, denom = self._step_batches()
            totals: dict[str, float] = {}
            for i, batch in enumerate(batches):
                with self._sync(last=i == len(batches) - 1):
                    for key, value in self._micro_step(batch.to(self.device), denom).items():
                        totals[key] = totals.get(key, 0.0) + value
            tokens, agreed_stop = sum(b.tokens for b in batches), False
            if self.ranks is not None:  # one all-reduce: the metrics, and a stop that every rank obeys at once
                keys = sorted(totals)
                summed = self.ranks.sum([totals[k] for k in keys] + [tokens, float(self.stop.requested)])
                totals, tokens, agreed_stop = dict(zip(keys, summed)), int(summed[-2]), summed[-1] > 0
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
            lr = self.scheduler.get_last_lr()[0]
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            last_loss = totals["loss"]
            if not math.isfinite(last_loss):
                raise errors.DataError(
                    f"the loss became {last_loss} at step {self.step}: lower learning_rate "
                    f"(now {cfg.learning_rate:g}) or set max_grad_norm"
                )
            used, peak = _memory(self.device)
            step_event = ev.Step(
                step=self.step,
                total_steps=self.total_steps,
                loss=last_loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9),
                memory_used_bytes=used,
                memory_peak_bytes=peak,
                epoch=self.sampler.epoch,
                elapsed_s=time.perf_counter() - started,
                **self._reward_stats(totals, denom),
            )
            self.reporter.emit(step_event)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
                if self.early.spent:
                    return self._finish(
                        RunStatus.COMPLETED, last_loss, note=self.early.note(self.step), stopped_early=True
                    )
            if agreed_stop if self.ranks is not None else self.stop.requested:
                path = self.save_checkpoint()
                return self._finish(
                    RunStatus.STOPPED, last_loss, note=f"Stopped at step {self.step}; resume from {path.name}"
                )
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        if self.val_examples:
            self.evaluate()
        return self._finish(RunStatus.COMPLETED, last_loss)

    def _reward_stats(self, totals: dict, pairs: int) -> dict:
        if not self.dpo:
            return {}
        chosen, rejected = totals["reward_chosen"] / pairs, totals["reward_rejected"] / pairs
        return {
            "reward_chosen": chosen,
            "reward_rejected": rejected,
            "reward_margin": chosen - rejected,
            "reward_accuracy": totals["reward_accuracy"] / pairs,
        }

    @torch.no_grad()
    def evaluate(self) -> None:
        """The eval loss (and, with early stopping, the best so far), then what the model answers now."""
        self.model.eval()
        bs, pad = self.config.batch_size, self.tokenizer.pad_token_id
        loss_sum = count = margin = correct = 0.0
        for start in range(0, len(self.val_examples), bs):
            idx = list(range(start, min(start + bs, len(self.val_examples))))
            batch = make_batch(self.val_examples, idx, pad, self.packing).to(self.device)
            with self._autocast():
                if not self.dpo:
                    out = self.logps(batch)
                    loss_sum += -out.logps.sum().item()
                    count += out.logps.numel()
                else:
                    losses, rc, rr = self._dpo_terms(batch)  # held-out pairs: reference computed here
                    loss_sum += losses.sum().item()
                    count += batch.pairs
                    margin += (rc - rr).sum().item()
                    correct += (rc > rr).float().sum().item()
        if count:
            eval_loss = loss_sum / count
            extra: dict[str, Any] = (
                {"reward_margin": margin / count, "reward_accuracy": correct / count} if self.dpo else {}
            )
            if self.early.patience:
                is_best = self.early.observe(self.step, eval_loss, self.model)
                if is_best:
                    self.store.update_run(
                        self.run_id,
                        best_step=self.step,
                        best_eval_loss=eval_loss,
                        best_checkpoint=str(self.early.best_dir),
                    )
                extra.update(best_eval_loss=self.early.best_eval_loss, best_step=self.early.best_step, is_best=is_best)
            self.reporter.emit(ev.Eval(step=self.step, eval_loss=eval_loss, **extra))
        if self.sample_prompts:
            shown, rendered = zip(*self.sample_prompts, strict=True)
            answers = samples.greedy_answers(
                self.model, self.tokenizer, list(rendered), self.config.sample_max_new_tokens, self.device
            )
            self.reporter.emit(ev.Sample(step=self.step, prompts=list(shown), answers=answers))
        self.model.train()

    # --- checkpoint and clean-up ------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = checkpoint.TrainerState(
            step=self.step,
            consumed=self.sampler.consumed,
            run_id=self.run_id,
            first_batch=self.sampler.first,
            **self.early.state(),
        )
        if self.ranks is not None:
            path = dist_checkpoint.save_checkpoint(
                self.run_dir, self.module, self.model, self.optimizer, self.scheduler, state, self.ranks, self.scaler
            )
        else:
            path = checkpoint.save_checkpoint(
                self.run_dir, self.model, self.optimizer, self.scheduler, state, self.scaler
            )
        self.reporter.emit(ev.CheckpointSaved(step=self.step, path=str(path)))
        return path

    def record_peak(self) -> None:
        """The run's measured peak beside its estimate: CUDA allocated and reserved, or the CPU resident peak."""
        device = getattr(self, "device", None)
        if device is None:
            return
        peak = memory_budget.measured_peak(device)
        self.store.update_run(self.run_id, memory_peak_bytes=peak.allocated, memory_reserved_peak_bytes=peak.reserved)

    def _finish(
        self, status: RunStatus, last_loss: float | None, note: str = "", stopped_early: bool = False
    ) -> RunResult:
        adapter_dir = None
        if status == RunStatus.COMPLETED:
            adapter_dir = self.run_dir / "adapter"
            weights = self.ranks.full_trainable_state(self.model) if self.ranks is not None else None
            if self.main:
                tmp = self.run_dir / f".adapter-tmp-{os.getpid()}"
                # the trained adapter only (a DPO run's frozen 'reference' copy is not saved)
                checkpoint.save_adapter(self.model, tmp, state_dict=weights)
                old = self.run_dir / f".adapter-old-{os.getpid()}"
                if adapter_dir.exists():  # moved aside, not deleted, until the new one is in place
                    os.replace(adapter_dir, old)
                os.replace(tmp, adapter_dir)
                if old.exists():
                    import shutil

                    shutil.rmtree(old)
        if note:
            self.reporter.log(note)
        self.record_peak()
        self.store.update_run(
            self.run_id,
            status=status,
            finished_at=time.time(),
            step=self.step,
            final_loss=last_loss,
            adapter_dir=str(adapter_dir or ""),
        )
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
        return RunResult(self.run_id, self.run_dir, status, self.step, adapter_dir, last_loss)


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
