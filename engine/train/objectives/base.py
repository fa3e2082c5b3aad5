"""What every objective is: :class:`Objective`, and :class:`TrainedModel`, the model as an objective sees it."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.protocol.message import Event
from finetune_studio.engine.datasets.render import tokenize_example
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.forward import TokenLogps
from finetune_studio.engine.train.init_adapter import StartingAdapter

Progress = Callable[[str, int, int, str], None]  # stage, done, total, message (``Reporter.progress``)


@dataclass(frozen=True)
class TrainedModel:
    """The model being trained, as an objective sees it."""

    model: Any  # the PEFT model: adapters on (the policy), off (the bare base), or its frozen 'reference' adapter
    logps: Callable[[Batch], TokenLogps]  # the training forward (DDP- or FSDP-wrapped on several processes)
    config: TrainConfig
    device: str
    autocast: Callable[[], AbstractContextManager]  # the run's autocast (CUDA in 16 bits), or nothing
    start: StartingAdapter | None = None  # the adapter the run started from (init_adapter), if any
    tokenizer: Any = None  # the run's tokenizer (an objective that writes or reads text: sampled answers)
    layout: Callable[[list], Batch] | None = None  # tokenized items -> one batch, padded or packed as the run trains
    model_folder: Path | None = None  # the folder the model was loaded from (a distillation's pruned student)


class Objective(abc.ABC):
    """Turns a batch into a loss and its metrics; one per run, made once the model is set up.

    The recipe calls :meth:`denominator` for the step's micro-batches (summed over them and over processes), then
    :meth:`loss` for each micro-batch inside its autocast, back-propagates the loss, sums the metric sums it returned
    (over micro-batches and processes) and hands them to :meth:`step_metrics`, whose figures the ``Step`` event
    carries. Evaluation sums :meth:`eval_sums` over the held-out batches (no gradient) and asks
    :meth:`eval_metrics`. The key ``loss`` is the recipe's.

    An objective may train modules of its own beside the adapter (a reward model's head): :meth:`extra_modules`
    names them, the optimizer trains their parameters, :meth:`save_state` writes them into every checkpoint and
    into the run's final (and best) adapter folder, and :meth:`load_state` restores them on resume.
    """

    name: ClassVar[str]  # the config's ``objective`` value
    data_kinds: ClassVar[tuple[str, ...]]  # the datasets it trains on (``engine.datasets``: sft, text, preference)
    needs_reference: ClassVar[bool] = False  # started from an adapter: load a frozen 'reference' copy of it too

    def __init__(self, trained: TrainedModel) -> None:
        self.trained = trained

    @classmethod
    def tokenize(cls, tokenizer: Any, example: Any, config: TrainConfig) -> Any:
        """One dataset example as this objective trains on it; set-up calls it for every example, before the
        objective is made. By default the example rendered as its kind is (``engine.datasets.render``); an
        objective that needs more of it (the prompt alone, the reference answer) returns a ``Tokenized`` that
        carries it too."""
        return tokenize_example(tokenizer, example, config.max_length, config.loss_on)

    def prepare(self, examples: Sequence, batch: Callable[[list[int]], Batch], progress: Progress) -> None:
        """Work done once before the first step, over the training ``examples`` (``batch(indices)`` lays some out
        on the device); nothing by default."""
        return None

    def prepare_eval(self, examples: Sequence) -> None:
        """Keep the held-out ``examples`` (their batches' ``indices`` point into them) for an evaluation that needs
        more than a batch's tokens (an online RL objective's answers and reward columns); nothing by default."""
        return None

    def step_batches(
        self, next_groups: Callable[[], list[list[int]]], batch: Callable[[list[int]], Batch]
    ) -> list[Batch]:
        """The micro-batches this process trains in the next optimizer step, on the CPU (the recipe moves each to
        the device). By default the next examples': ``next_groups()`` is this process's share of the next global
        batch, one list of example indices per micro-batch, and ``batch`` lays one list out. An objective that
        makes its own sequences from the examples (an online RL objective's sampled answers), or trains on the same
        ones for several steps, overrides it: the data position moves only when it calls ``next_groups``."""
        return [batch(g) for g in next_groups()]

    def step_events(self, step: int) -> list[Event]:
        """Events of the objective's own, emitted after optimizer step ``step``'s ``Step`` event (an online RL
        objective's sampled answers); none by default."""
        return []

    @abc.abstractmethod
    def denominator(self, batch: Batch) -> int:
        """What the step's loss is averaged over, as much of it as ``batch`` holds (trained tokens, pairs)."""

    @abc.abstractmethod
    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss (its sum over ``denom``, the step's whole denominator), to
        back-propagate, and its sums of the objective's metrics."""

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        """The step's figures from the summed metric sums of :meth:`loss`; none by default."""
        return {}

    @abc.abstractmethod
    def eval_sums(self, batch: Batch) -> dict[str, float]:
        """A held-out batch's ``loss`` (summed), the ``count`` it is averaged over, and sums of other figures."""

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The evaluation's figures beside the eval loss (``sums["loss"] / sums["count"]``); none by default."""
        return {}

    # Which evaluation is the best (early stopping's ``best/``, the run's best checkpoint): "" for the lowest eval
    # loss, or the name of one of :meth:`eval_metrics`' figures, the highest being the best (an RL objective's
    # held-out reward, which its eval loss does not follow).
    best_metric: str = ""

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules of the objective's own, by name, made in ``__init__`` on the run's device: the
        optimizer trains their parameters beside the adapter's. None by default."""
        return {}

    def save_state(self, folder: Path, *, final: bool) -> None:
        """Write the objective's own files into ``folder``, an adapter folder being written (renamed into place
        afterwards): a checkpoint (``final`` False) or the run's final or best adapter (``final`` True). Nothing by
        default."""
        return None

    def finish_events(self, saved: Path, examples: Sequence) -> list[Event]:
        """Events of the objective's own when the run completes, its final folder ``saved`` in place; ``examples``:
        tokenised examples, held-out ones first (a distillation times its student beside its teacher on their
        prompts). None by default."""
        return []

    def load_state(self, folder: Path) -> None:
        """Restore what :meth:`save_state` wrote into the checkpoint ``folder`` (a resumed run). Nothing by
        default."""
        return None
