"""The objective is a seam: a new objective, registered here only, trains through the unchanged recipe."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_dpo, write_sft

from finetune_studio.core import config as config_module
from finetune_studio.core.config import ConfigError
from finetune_studio.engine.train import objectives
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.losses import sft_loss
from finetune_studio.engine.train.objectives import Objective
from finetune_studio.engine.train.recipe import TrainingFailed, train_run
from finetune_studio.engine.train.reporting import Reporter

SCALE = 4.0  # a power of two: the scaled loss is the SFT loss times 4 exactly


class ScaledSFT(Objective):
    """A toy objective: SFT's loss times a constant, with a figure of its own (the unscaled loss) and an eval
    figure of its own (the trained tokens evaluated)."""

    name = "scaled_sft"
    data_kinds = ("sft", "text")

    def denominator(self, batch: Batch) -> int:
        return batch.trained_tokens

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = SCALE * sft_loss(self.trained.logps(batch).logps, denom)
        return loss, {"unscaled": loss.item() / SCALE}

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        return {"unscaled_loss": sums["unscaled"]}

    def eval_sums(self, batch: Batch) -> dict[str, float]:
        out = self.trained.logps(batch)
        return {"loss": -SCALE * out.logps.sum().item(), "count": out.logps.numel()}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"tokens_evaluated": sums["count"]}


@pytest.fixture
def scaled_sft(monkeypatch):
    """ScaledSFT registered for this test only (the registry, and the names the config accepts)."""
    monkeypatch.setattr(objectives, "REGISTRY", dict(objectives.REGISTRY))
    monkeypatch.setattr(config_module, "OBJECTIVES", (*config_module.OBJECTIVES, ScaledSFT.name))
    objectives.register(ScaledSFT)
    return ScaledSFT


def test_a_new_objective_trains_through_the_recipe(tiny_model_dir, tmp_path, scaled_sft):
    data = write_sft(tmp_path / "d.jsonl")
    settings = dict(max_steps=6, learning_rate=1e-2, eval_every=3, compute_dtype="float32")
    sft, toy = Recorder(), Recorder()
    train_run(tiny_config(tiny_model_dir, data, **settings), reporter=Reporter(extra=sft))
    result = train_run(
        tiny_config(tiny_model_dir, data, objective=scaled_sft.name, **settings), reporter=Reporter(extra=toy)
    )
    assert result.status == "completed"
    steps = toy.of("step")
    assert len(steps) == 6
    # the first step's loss is computed before any update: the SFT run's, times the constant
    assert steps[0].loss == SCALE * sft.of("step")[0].loss
    # its own figure reaches the events, beside the loss it came from
    assert all(s.metrics["unscaled_loss"] == pytest.approx(s.loss / SCALE, rel=1e-6) for s in steps)
    assert all(s.reward_margin is None for s in steps)
    assert steps[-1].loss < steps[0].loss * 0.97
    # its eval figure too: at step 3 and at the end, over the same held-out tokens
    evals = toy.of("eval")
    assert [e.step for e in evals] == [3, 6]
    assert evals[0].metrics["tokens_evaluated"] == evals[1].metrics["tokens_evaluated"] > 0


def test_an_objective_trains_only_on_the_data_it_names(tiny_model_dir, tmp_path, scaled_sft):
    config = tiny_config(tiny_model_dir, write_dpo(tmp_path / "p.jsonl"), objective=scaled_sft.name, max_steps=1)
    with pytest.raises(TrainingFailed, match="SCALED_SFT objective needs sft or text data"):
        train_run(config)


def test_the_registry_names_what_it_holds():
    assert objectives.objective_class("dpo") is objectives.DPO
    assert objectives.DPO.needs_reference and not objectives.SFT.needs_reference
    assert objectives.objective_class("reward") is objectives.Reward and not objectives.Reward.needs_reference
    with pytest.raises(ConfigError, match="must be one of sft, dpo, reward.*, not 'kto'"):
        objectives.objective_class("kto")
