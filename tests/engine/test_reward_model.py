"""The reward objective and the reward model it saves: the loss against its formula, a synthetic preference learnt
on the tiny model, the saved folder read back with the same scores, resume with the head restored."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import Recorder
from reward_helpers import MARK, reward_config, synthetic_pairs, train_reward_model, write_pairs

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.engine import reward_model as rm
from finetune_studio.engine.datasets import load_dataset
from finetune_studio.engine.datasets.split import split_by_prompt
from finetune_studio.engine.train.losses import reward_loss
from finetune_studio.engine.train.recipe import StopFlag, train_run
from finetune_studio.engine.train.reporting import Reporter


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One reward run on 200 synthetic pairs (40 steps of 8 pairs, about 5 s), in a data home of its own."""
    return train_reward_model(tiny_model_dir, tmp_path_factory.mktemp("reward-run"))


def test_the_loss_is_the_bradley_terry_formula():
    chosen = torch.tensor([1.5, -0.25, 3.0, 0.0])
    rejected = torch.tensor([0.5, 0.75, -2.0, 0.0])
    for margin in (0.0, 0.5):
        expected = [math.log1p(math.exp(-(c - r - margin))) for c, r in zip(chosen.tolist(), rejected.tolist())]
        assert reward_loss(chosen, rejected, margin).tolist() == pytest.approx(expected, rel=1e-6)
    per_pair = torch.tensor([0.0, 1.0, 2.0, 0.25])
    expected = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(chosen, rejected, per_pair.tolist())]
    assert reward_loss(chosen, rejected, per_pair).tolist() == pytest.approx(expected, rel=1e-6)
    # the gradient pushes the chosen reward up and the rejected one down, by sigmoid(-(c - r - m))
    c, r = torch.tensor([0.3], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    reward_loss(c, r, 0.5).sum().backward()
    s = 1 / (1 + math.exp(-(0.3 - 0.1 - 0.5)))
    assert c.grad.item() == pytest.approx(-(1 - s)) and r.grad.item() == pytest.approx(1 - s)


def test_the_reward_model_learns_a_synthetic_preference(trained):
    result, events, _config = trained
    steps, evals = events.of("step"), events.of("eval")
    assert all(s.reward_accuracy is not None and s.reward_margin is not None for s in steps)
    assert steps[-1].reward_margin == pytest.approx(steps[-1].reward_chosen - steps[-1].reward_rejected)
    assert steps[-1].loss < 0.5 * steps[0].loss
    assert evals and evals[-1].reward_accuracy > 0.95 and evals[-1].reward_margin > 1.0
    model = rm.RewardModel.load(result.adapter_dir)
    fresh = synthetic_pairs(100, seed=1)  # pairs never seen in training or its evaluation
    prompts = [p["prompt"] for p in fresh]
    chosen = model.score(prompts, [p["chosen"] for p in fresh])
    rejected = model.score(prompts, [p["rejected"] for p in fresh])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(fresh)
    assert accuracy > 0.95


def test_the_saved_folder_scores_as_the_trained_model_did(trained):
    """The loaded folder's mean reward gap over the run's held-out pairs is the gap the run's last evaluation
    reported: adapter, head, rendering and the last token all read back as trained."""
    result, events, config = trained
    folder = result.adapter_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", rm.HEAD_WEIGHTS, rm.HEAD_INFO, "README.md"):
        assert (folder / name).is_file(), name
    info = rm.HeadInfo.read(folder)
    assert info.hidden_size == 64 and info.base_model == config.model and info.max_length == config.max_length
    assert "reward model" in (folder / "README.md").read_text(encoding="utf-8").lower()
    _train, validation = split_by_prompt(load_dataset(config.dataset).examples, config.validation_fraction, config.seed)
    model = rm.RewardModel.load(folder)
    prompts = [ex.prompt for ex in validation]
    chosen = model.score(prompts, [ex.chosen[0].content for ex in validation])
    rejected = model.score(prompts, [ex.rejected[0].content for ex in validation])
    gap = sum(c - r for c, r in zip(chosen, rejected)) / len(validation)
    assert gap == pytest.approx(events.of("eval")[-1].reward_margin, rel=1e-4)
    again = rm.RewardModel.load(folder).score(prompts[:5], [ex.chosen[0].content for ex in validation[:5]])
    assert again == pytest.approx(chosen[:5], abs=1e-5)


def test_resume_restores_the_head(tiny_model_dir, tmp_path):
    """Stopped at step 3 and resumed, the run's curve is the uninterrupted one: the checkpoint carried the head and
    its optimizer state (a fresh head after resume would score every pair differently)."""
    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(80, seed=3))
    config = reward_config(tiny_model_dir, data, max_steps=6, batch_size=4, eval_every=0, checkpoint_every=3)
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    stop, first = StopFlag(), Recorder()

    def stop_at_three(event):
        first(event)
        if event.type == "step" and event.step == 3:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_three), stop=stop)
    assert stopped.status == "stopped" and stopped.step == 3
    assert (stopped.run_dir / "checkpoints" / "step-000003" / rm.HEAD_WEIGHTS).is_file()
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert resumed.status == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)
    accuracy = [e.reward_accuracy for e in first.of("step") + second.of("step")]
    assert accuracy == pytest.approx([e.reward_accuracy for e in full.of("step")])


def test_a_folder_that_is_not_a_reward_model_is_refused(tiny_model_dir, tmp_path):
    from tiny_model import build_adapter_dir

    plain = build_adapter_dir(tiny_model_dir, tmp_path / "plain", seed=1)
    with pytest.raises(rm.RewardModelError, match="not a reward model"):
        rm.RewardModel.load(plain)


def test_the_reward_objective_takes_the_preference_store():
    config = TrainConfig(objective="reward", dataset="pairs:latest")
    assert config.dataset == "pairs:latest"
    with pytest.raises(ConfigError, match="DPO or reward"):
        TrainConfig(objective="sft", dataset="pairs:latest")
    with pytest.raises(ConfigError, match="reward_margin"):
        TrainConfig(objective="reward", reward_margin=-1)


def test_the_memory_estimate_covers_the_reward_objective():
    """Pairs like DPO (two sequences per example), no reference pass, no output head: a scalar head whose h + 1
    parameters are trained. (tests/core/test_memory.py checks the figures against a measured reward step.)"""
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory.estimate import ModelShape, estimate_training_memory

    gpu = DeviceInfo("cuda", "Test GPU", 8 * 2**30, 8 * 2**30, True)
    shape = ModelShape.for_model_spec("default")
    sft, dpo, reward = (
        estimate_training_memory(shape, TrainConfig(objective=o, batch_size=4, max_length=256, packing=False), gpu)
        for o in ("sft", "dpo", "reward")
    )
    assert reward.batch.rows == dpo.batch.rows == 2 * sft.batch.rows == 8
    assert "4 pairs" in reward.batch.description
    assert reward.trainable_params == dpo.trainable_params + shape.hidden_size + 1
    assert reward.reference_forward == 0
    # 8 sequences' last hidden state and its float32 copy, instead of 8 x 255 tokens through a 49k vocabulary
    assert reward.logits == 8 * (shape.hidden_size * 2 + 4 * shape.hidden_size + 16) < dpo.logits / 1000
    assert reward.total_bytes < dpo.total_bytes


def test_the_config_knows_which_objectives_train_on_pairs():
    """core.config's PAIR_OBJECTIVES (what the memory estimate reads) agrees with the engine's objectives."""
    from finetune_studio.core.config import PAIR_OBJECTIVES, SCALAR_HEAD_OBJECTIVES
    from finetune_studio.engine.train import objectives

    for name, cls in objectives.REGISTRY.items():
        assert (cls.data_kinds == ("preference",)) == (name in PAIR_OBJECTIVES), name
        assert (name in SCALAR_HEAD_OBJECTIVES) == (cls is objectives.Reward), name


def test_a_bottleneck_reward_model_trains_saves_and_loads(tiny_model_dir, tmp_path):
    """The head rides on any method that adapts the layers: a bottleneck adapter (not a PEFT model) too."""
    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=4))
    config = reward_config(tiny_model_dir, data, method="houlsby", max_steps=4, batch_size=4, eval_every=2)
    events = Recorder()
    result = train_run(config, reporter=Reporter(extra=events))
    assert result.status == "completed" and rm.is_reward_model(result.adapter_dir)
    _train, validation = split_by_prompt(load_dataset(config.dataset).examples, config.validation_fraction, config.seed)
    model = rm.RewardModel.load(result.adapter_dir)
    prompts = [ex.prompt for ex in validation]
    chosen = model.score(prompts, [ex.chosen[0].content for ex in validation])
    rejected = model.score(prompts, [ex.rejected[0].content for ex in validation])
    gap = sum(c - r for c, r in zip(chosen, rejected)) / len(validation)
    assert gap == pytest.approx(events.of("eval")[-1].reward_margin, rel=1e-4)


def test_a_method_of_virtual_tokens_is_refused_naming_the_method(tiny_model_dir, tmp_path):
    from finetune_studio.engine.train.recipe import TrainingFailed

    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(20, seed=5))
    events = Recorder()
    with pytest.raises(TrainingFailed, match="method: prompt_tuning trains virtual tokens"):
        train_run(
            reward_config(tiny_model_dir, data, method="prompt_tuning", packing=False), reporter=Reporter(extra=events)
        )
    assert events.of("failed")[0].kind == "config"


def test_the_export_of_a_reward_run_is_a_reward_model(tiny_model_dir, tmp_path):
    from finetune_studio.engine.export.writer import ExportRequest, export

    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=6))
    result = train_run(reward_config(tiny_model_dir, data, max_steps=3, batch_size=4, eval_every=0))
    out = export(ExportRequest(run=result.run_id, out=tmp_path / "export", check=False)).path
    assert rm.is_reward_model(out)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Reward model" in card and "reward score --model" in card
    prompts, answers = ["Say something about item 1."] * 2, [f"the {MARK} and the dog", "the sea and the dog"]
    exported = rm.RewardModel.load(out).score(prompts, answers)
    assert exported == pytest.approx(rm.RewardModel.load(result.adapter_dir).score(prompts, answers), abs=1e-6)


def test_a_reward_run_started_from_a_reward_model_keeps_its_head(trained, tiny_model_dir, tmp_path):
    """init_adapter naming a reward model's folder: the adapter and the head go on from it (a fresh head would score
    the pairs as the untrained model did)."""
    result, _events, _config = trained
    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(20, seed=7))
    config = reward_config(
        tiny_model_dir, data, init_adapter=str(result.adapter_dir), max_steps=1, learning_rate=1e-9, eval_every=0
    )
    again = train_run(config)
    prompts, answers = ["Say something about item 2."] * 2, [f"wind {MARK} salt", "wind sea salt"]
    before = rm.RewardModel.load(result.adapter_dir).score(prompts, answers)
    after = rm.RewardModel.load(again.adapter_dir).score(prompts, answers)
    assert after == pytest.approx(before, abs=1e-4) and before[0] - before[1] > 1


def test_packed_and_padded_batches_give_the_same_curve(tiny_model_dir, tmp_path):
    """Each sequence's last token is found in a packed row as in a padded batch: the same losses and accuracies."""
    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=8))
    curves = []
    for packing in (True, False):
        events = Recorder()
        train_run(
            reward_config(tiny_model_dir, data, packing=packing, max_steps=3, batch_size=4, eval_every=0),
            reporter=Reporter(extra=events),
        )
        curves.append([(e.loss, e.reward_margin) for e in events.of("step")])
    assert len(curves[0]) == 3
    assert [x for step in curves[0] for x in step] == pytest.approx([x for step in curves[1] for x in step], abs=1e-4)


def test_the_best_checkpoint_of_early_stopping_is_a_reward_model(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=9))
    events = Recorder()
    config = reward_config(tiny_model_dir, data, max_steps=4, batch_size=4, eval_every=2, early_stopping_patience=3)
    result = train_run(config, reporter=Reporter(extra=events))
    best = result.run_dir / "best"
    assert rm.is_reward_model(best) and (best / "README.md").is_file()
    _train, validation = split_by_prompt(load_dataset(config.dataset).examples, config.validation_fraction, config.seed)
    model = rm.RewardModel.load(best)
    prompts = [ex.prompt for ex in validation]
    chosen = model.score(prompts, [ex.chosen[0].content for ex in validation])
    rejected = model.score(prompts, [ex.rejected[0].content for ex in validation])
    best_eval = next(e for e in events.of("eval") if e.is_best and e.step == events.of("finished")[0].best_step)
    gap = sum(c - r for c, r in zip(chosen, rejected)) / len(validation)
    assert gap == pytest.approx(best_eval.reward_margin, rel=1e-4)
