"""Knowledge distillation: the student (the model being trained) learns the teacher's distribution over the vocabulary.

Per trained position, ``alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE`` with ``D`` the forward KL, the
reverse KL or the generalised JSD (``kernels.distill_logits``), averaged over the step's trained tokens. The teacher
(``engine.train.teacher``) runs first, without gradients, and only its hidden states at the trained positions are
kept; both output heads are applied chunk by chunk inside the loss, so neither model's [N, V] distribution exists
whole.

Off-policy (the default) trains on the dataset's answers. On-policy (``distill_on_policy``) replaces each answer
with one the student samples for the same prompt (temperature 1, up to twice the dataset's answer's length, with the
engine's decode loop and the adapters live), which the teacher then scores; each prompt's sample is seeded by the run's
seed and the example's index, so a resumed run samples what the uninterrupted one would have from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core.config import ConfigError
from finetune_studio.core.protocol.message import Event
from finetune_studio.core.store import Store
from finetune_studio.engine.datasets.render import IGNORE
from finetune_studio.engine.decoding.decode import decode_batch
from finetune_studio.engine.decoding.token_sampling import Sampler
from finetune_studio.engine.models import LoadOptions, compute_dtype, load_tokenizer
from finetune_studio.engine.train import distill_speed
from finetune_studio.engine.train import teacher as teachers
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.forward import LogprobModel
from finetune_studio.engine.train.losses import sequence_logps
from finetune_studio.engine.train.objectives.base import Objective, Progress, TrainedModel
from finetune_studio.kernels.distill_logits import DistillLosses, distill_losses


class Distill(Objective):
    """The distillation loss over the step's trained tokens; ``kl`` and ``ce`` per token as the step's figures."""

    name = "distill"
    data_kinds = ("sft", "text")

    def __init__(self, trained: TrainedModel) -> None:
        super().__init__(trained)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ConfigError("parallelism", "distillation trains in one process for now: run it without --nproc")
        self.student = LogprobModel(trained.model, kernels="torch")
        if not self.student.fused:
            raise ConfigError(
                "target_modules",
                "distillation needs the student's output head as a plain linear layer: leave lm_head out",
            )
        self.teacher: teachers.Teacher | None = None
        self.tokenizer: Any = None
        self.vocab = 0  # the heads' common rows

    def prepare(self, examples: Sequence, batch: Callable[[list[int]], Batch], progress: Progress) -> None:
        """Load the teacher (after checking its tokenizer against the student's)."""
        cfg, device = self.trained.config, self.trained.device
        options = LoadOptions(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(cfg.model, options)
        if cfg.distill_on_policy and examples and all(_first_trained(e.labels) <= 1 for e in examples[:8]):
            raise ConfigError("distill_on_policy", "needs prompts to answer: train on chat (SFT) data, not plain text")
        store = Store()
        try:
            self.teacher = teachers.load(
                cfg, self.tokenizer, device, compute_dtype(cfg.compute_dtype, device), store, progress
            )
        finally:
            store.close()
        rows_s, rows_t = self.student.head.weight.shape[0], self.teacher.weight.shape[0]
        self.vocab = min(rows_s, rows_t)
        if self.vocab < len(self.tokenizer):
            raise ConfigError(
                "distill_teacher",
                f"{self.teacher.description}: its output head has {rows_t:,} rows, the student's {rows_s:,}, the "
                f"tokenizer {len(self.tokenizer):,} tokens",
            )

    def finish_events(self, saved: Path, examples: Sequence) -> list[Event]:
        """``distill_measure_speed``: the trained student's generation speed beside the teacher's
        (:mod:`engine.train.distill_speed`), the student loaded from ``saved`` in the teacher's dtype."""
        cfg, device = self.trained.config, self.trained.device
        if not cfg.distill_measure_speed or self.teacher is None or self.trained.model_folder is None:
            return []
        run_dtype = compute_dtype(cfg.compute_dtype, device)
        dtype = teachers.teacher_dtype(cfg.distill_teacher_precision, run_dtype, device)
        student = distill_speed.load_student(saved, self.trained.model_folder, cfg, dtype, device)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        event = distill_speed.measure(self.teacher.model, student, examples, pad_id=pad)
        return [event] if event is not None else []

    def denominator(self, batch: Batch) -> int:
        """Off-policy: the trained tokens; on-policy: the sequences (the samples' lengths are not known yet, so each
        sample's tokens are averaged first)."""
        return batch.sequences if self.trained.config.distill_on_policy else batch.trained_tokens

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.trained.config.distill_on_policy:
            out = self.terms(batch)
            return out.loss.sum() / max(denom, 1), {"kl": out.kl.sum().item(), "ce": out.ce.sum().item()}
        batch = self.on_policy(batch)
        out = self.terms(batch)
        rows = (batch.labels[:, 1:] != IGNORE).nonzero()[:, 0]  # [N] the sample of each token
        per_sample = [sequence_logps(t, rows, batch.sequences, average=True) for t in out]  # [B] token means
        loss, kl, ce = (t.sum() for t in per_sample)
        return loss / max(denom, 1), {"kl": kl.item(), "ce": ce.item()}

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        return {"kl": sums["kl"] / max(denom, 1), "ce": sums["ce"] / max(denom, 1)}

    def eval_sums(self, batch: Batch) -> dict[str, float]:
        out = self.terms(batch)  # held-out: the dataset's answers, whatever the training samples
        return {
            "loss": out.loss.sum().item(),
            "count": out.loss.numel(),
            "kl": out.kl.sum().item(),
            "ce": out.ce.sum().item(),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"kl": sums["kl"] / sums["count"], "ce": sums["ce"] / sums["count"]}

    def terms(self, batch: Batch) -> DistillLosses:
        """Per trained token: the loss, the divergence and the cross-entropy. The teacher runs first, so that no
        student graph is alive during its pass."""
        assert self.teacher is not None, "prepare() loads the teacher"
        cfg = self.trained.config
        ht = self.teacher.hidden(batch)  # [N, Ht], no graph
        wt = self.teacher.weight[: self.vocab]
        hs, targets = self.student.trained_hidden(batch)  # [N, Hs], [N]
        ws = self.student.head.weight[: self.vocab]
        if hs.dtype != ws.dtype:  # bf16-mixed on the CPU: the head in float32, as the training forward does
            hs, ws = hs.float(), ws.float()
        if ht.dtype != wt.dtype:
            ht, wt = ht.float(), wt.float()
        with torch.autocast(hs.device.type, enabled=False):
            return distill_losses(
                hs,
                ws,
                ht,
                wt,
                targets,
                divergence=cfg.distill_divergence,
                temperature=cfg.distill_temperature,
                alpha=cfg.distill_alpha,
                beta=cfg.distill_jsd_beta,
                student_softcap=self.student.softcap,
                teacher_softcap=self.teacher.softcap,
            )

    @torch.no_grad()
    def on_policy(self, batch: Batch) -> Batch:
        """``batch`` with each answer replaced by one the student samples for its prompt (padded rows)."""
        assert self.tokenizer is not None
        cfg, tok = self.trained.config, self.tokenizer
        stop = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set()
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            stop.add(im_end)
        prompts, budgets = [], []
        for seq_ids, seq_labels in _sequences(batch):
            start = _first_trained(seq_labels)  # seq_labels[start] is the answer's first token
            prompts.append(seq_ids[:start])
            budgets.append(max(1, min(2 * (len(seq_ids) - start), cfg.max_length - start)))
        answers: list[list[int]] = [[] for _ in prompts]

        def collect(i: int) -> Callable[[list[int]], list[bool]]:
            def on_tokens(tokens: list[int]) -> list[bool]:
                answers[i].append(tokens[0])
                return [tokens[0] in stop]

            return on_tokens

        model = self.trained.model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = model.training
        model.eval()
        try:
            decode_batch(
                causal_lm,
                prompts,
                [1] * len(prompts),
                budgets,
                Sampler(temperature=1.0),
                [collect(i) for i in range(len(prompts))],
                [cfg.seed * 1_000_003 + i for i in batch.indices] or list(range(len(prompts))),
                pad_id=tok.pad_token_id or 0,
            )
        finally:
            model.train(was_training)
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((len(prompts), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            n = len(p) + len(a)
            ids[row, :n] = torch.tensor(p + a)
            mask[row, :n] = 1
            labels[row, len(p) : n] = torch.tensor(a)
        device = batch.input_ids.device
        return Batch(ids.to(device), mask.to(device), labels.to(device), indices=batch.indices)


def _first_trained(labels: Sequence[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))


def _sequences(batch: Batch) -> list[tuple[list[int], list[int]]]:
    """Each sequence's (token ids, labels), unpadded, from a padded or packed batch."""
    out = []
    if batch.packed:
        ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
        at = 0
        for n in batch.sequence_lengths:
            out.append((ids[at : at + n], labels[at : at + n]))
            at += n
        return out
    for row, n in enumerate(batch.sequence_lengths):
        out.append((batch.input_ids[row, :n].tolist(), batch.labels[row, :n].tolist()))
    return out
