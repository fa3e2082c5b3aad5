"""PPO with a value head: the token rewards, GAE, whitening and the losses equal the formulas written out; a
tiny-model run raises its mean reward under a deterministic verifier; resume reproduces the uninterrupted curve; the
value head is saved beside the adapter and read back by a run that starts from it; the memory estimate counts it."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.config import OBJECTIVE_LABELS, OBJECTIVES, ConfigError, TrainConfig
from finetune_studio.engine.train.losses import (
    gae_advantages,
    ppo_token_losses,
    ppo_token_rewards,
    ppo_value_losses,
    whiten,
)
from finetune_studio.engine.train.objectives import PPO, REGISTRY
from finetune_studio.engine.train.objectives.ppo import VALUE_HEAD_INFO, VALUE_HEAD_WEIGHTS
from finetune_studio.engine.train.recipe import StopFlag, train_run
from finetune_studio.engine.train.reporting import Reporter

# --- the formulas on fixed tensors ---------------------------------------------------------------------------------

# Four answers of 3, 1, 4 and 2 tokens, their scores, and per token the sampling policy's and the reference's
# log-probs, the values at sampling time, the policy's log-probs and values now.
ROWS = [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
SCORES = [1.0, 0.0, 2.0, -0.5]
OLD = [-1.4, -2.0, -0.4, -2.5, -1.0, -0.1, -2.9, -0.95, -1.7, -0.7]
REF = [-1.1, -1.8, -0.6, -2.9, -1.5, -0.2, -2.0, -1.0, -1.6, -0.5]
OLD_VALUES = [0.3, 0.5, 0.9, -0.2, 1.0, 1.2, 1.5, 1.9, 0.1, -0.3]
LOGPS = [-1.0, -2.0, -0.5, -3.0, -1.2, -0.1, -2.2, -0.9, -1.7, -0.3]  # ratios in and out of [0.8, 1.2]
VALUES = [0.35, 0.9, 0.75, -0.1, 1.0, 1.6, 1.45, 1.2, 0.12, -0.2]  # some moved past V_old +- 0.2
KL_COEF, GAMMA, LAM, CLIP, CLIP_V = 0.1, 0.9, 0.8, 0.2, 0.2


def answers() -> list[list[int]]:
    """Each answer's token positions, in order."""
    return [[t for t, r in enumerate(ROWS) if r == a] for a in range(len(SCORES))]


def direct_token_rewards() -> list[float]:
    out = [-KL_COEF * (o - r) for o, r in zip(OLD, REF)]
    for a, tokens in enumerate(answers()):
        out[tokens[-1]] += SCORES[a]  # the score at the answer's last token
    return out


def direct_gae(rewards: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    """GAE written out per answer, from its last token back; V after the last token is 0."""
    advantages = [0.0] * len(rewards)
    for tokens in answers():
        running = 0.0
        for i in reversed(range(len(tokens))):
            t = tokens[i]
            next_value = values[tokens[i + 1]] if i + 1 < len(tokens) else 0.0
            delta = rewards[t] + GAMMA * next_value - values[t]
            running = delta + GAMMA * LAM * running
            advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def t64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_the_token_rewards_are_the_kl_penalty_plus_the_score_at_the_last_token():
    got = ppo_token_rewards(t64(SCORES), t64(OLD), t64(REF), torch.tensor(ROWS), kl_coef=KL_COEF)
    assert got.tolist() == pytest.approx(direct_token_rewards(), abs=1e-12)
    without = ppo_token_rewards(t64(SCORES), t64(OLD), None, torch.tensor(ROWS), kl_coef=KL_COEF)
    assert without.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, -0.5]


def test_gae_equals_the_recursion_written_out_per_answer():
    rewards = direct_token_rewards()
    advantages, returns = gae_advantages(t64(rewards), t64(OLD_VALUES), torch.tensor(ROWS), gamma=GAMMA, lam=LAM)
    want_adv, want_ret = direct_gae(rewards, OLD_VALUES)
    assert advantages.tolist() == pytest.approx(want_adv, abs=1e-12)
    assert returns.tolist() == pytest.approx(want_ret, abs=1e-12)
    # lambda 1 and gamma 1: each token's advantage is the rest of its answer's rewards minus its value (Monte Carlo)
    mc, _ = gae_advantages(t64(rewards), t64(OLD_VALUES), torch.tensor(ROWS), gamma=1.0, lam=1.0)
    for tokens in answers():
        for i, t in enumerate(tokens):
            assert mc[t].item() == pytest.approx(sum(rewards[u] for u in tokens[i:]) - OLD_VALUES[t], abs=1e-12)


def test_whitening_is_zero_mean_unit_sample_variance():
    x = [0.5, -1.0, 2.0, 3.5, 0.0]
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / (len(x) - 1)
    assert whiten(t64(x)).tolist() == pytest.approx([(v - mean) / math.sqrt(var + 1e-8) for v in x], abs=1e-12)


def test_the_losses_are_the_clipped_policy_and_value_losses():
    advantages = whiten(t64(direct_gae(direct_token_rewards(), OLD_VALUES)[0]))
    returns = t64(direct_gae(direct_token_rewards(), OLD_VALUES)[1])
    logps = t64(LOGPS).requires_grad_(True)
    values = t64(VALUES).requires_grad_(True)
    policy, value, clipped, value_clipped = ppo_token_losses(
        logps, t64(OLD), advantages, values, t64(OLD_VALUES), returns, cliprange=CLIP, cliprange_value=CLIP_V
    )
    want_policy, want_value, want_clipped, want_value_clipped = [], [], [], []
    for t in range(len(ROWS)):
        a, rho, ret = advantages[t].item(), math.exp(LOGPS[t] - OLD[t]), returns[t].item()
        want_policy.append(max(-rho * a, -min(max(rho, 1 - CLIP), 1 + CLIP) * a))
        v_clip = min(max(VALUES[t], OLD_VALUES[t] - CLIP_V), OLD_VALUES[t] + CLIP_V)
        plain, bounded = (VALUES[t] - ret) ** 2, (v_clip - ret) ** 2
        want_value.append(0.5 * max(plain, bounded))
        want_clipped.append((rho < 1 - CLIP and a < 0) or (rho > 1 + CLIP and a > 0))
        want_value_clipped.append(bounded > plain)
    assert policy.tolist() == pytest.approx(want_policy, abs=1e-12)
    assert value.tolist() == pytest.approx(want_value, abs=1e-12)
    assert clipped.tolist() == want_clipped and value_clipped.tolist() == want_value_clipped
    assert 0 < sum(want_clipped) < len(ROWS) and 0 < sum(want_value_clipped) < len(ROWS)  # both clips in play
    # the gradients: none through a clipped ratio or a clipped value; else -rho * A and (V - R)
    (policy + 0.5 * value).sum().backward()
    for t in range(len(ROWS)):
        rho = math.exp(LOGPS[t] - OLD[t])
        assert logps.grad[t].item() == pytest.approx(0.0 if want_clipped[t] else -rho * advantages[t].item())
        want_v = 0.0 if want_value_clipped[t] else 0.5 * (VALUES[t] - returns[t].item())
        assert values.grad[t].item() == pytest.approx(want_v, abs=1e-12)
    alone, alone_clipped = ppo_value_losses(t64(VALUES), t64(OLD_VALUES), returns, cliprange_value=CLIP_V)
    assert alone.tolist() == pytest.approx(want_value) and alone_clipped.tolist() == want_value_clipped


# --- the settings and the registration ----------------------------------------------------------------------------


def test_ppo_is_registered_and_its_settings_are_checked():
    assert "ppo" in OBJECTIVES and OBJECTIVE_LABELS["ppo"] == "PPO" and REGISTRY["ppo"] is PPO
    with pytest.raises(ConfigError) as caught:
        TrainConfig(objective="ppo")
    assert caught.value.field == "rewards"
    rewards = [{"kind": "json_valid"}]
    for bad, field in (
        ({"ppo_samples_per_prompt": 0}, "ppo_samples_per_prompt"),
        ({"ppo_max_new_tokens": 512, "max_length": 512}, "ppo_max_new_tokens"),
        ({"ppo_temperature": 0}, "ppo_temperature"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"ppo_cliprange": 1.0}, "ppo_cliprange"),
        ({"ppo_cliprange_value": 0}, "ppo_cliprange_value"),
        ({"ppo_vf_coef": -0.1}, "ppo_vf_coef"),
        ({"ppo_kl_coef": -1}, "ppo_kl_coef"),
        ({"ppo_gamma": 1.5}, "ppo_gamma"),
        ({"ppo_lambda": -0.1}, "ppo_lambda"),
        ({"method": "full"}, "ppo_kl_coef"),  # a full fine-tune keeps no start weights for the KL penalty
        ({"method": "prompt_tuning", "packing": False}, "objective"),  # the decode loop sees no virtual tokens
    ):
        with pytest.raises(ConfigError) as caught:
            TrainConfig(objective="ppo", rewards=rewards, **bad)
        assert caught.value.field == field, bad
    assert TrainConfig(objective="ppo", rewards=rewards, method="full", ppo_kl_coef=0.0).method == "full"


# --- runs on the tiny model ----------------------------------------------------------------------------------------

LETTER = [{"kind": "regex", "pattern": "[a-z]", "name": "letter"}]  # 1 when the answer holds a lowercase letter


def ppo_config(model_dir, data, **kw) -> TrainConfig:
    settings = dict(
        objective="ppo",
        rewards=LETTER,
        ppo_samples_per_prompt=8,
        ppo_max_new_tokens=2,
        ppo_epochs=1,
        batch_size=4,
        learning_rate=3e-2,
        lr_scheduler="constant",
        compute_dtype="float32",
    )
    settings.update(kw)
    return tiny_config(model_dir, data, **settings)


FIGURES = {
    "reward",
    "reward/letter",
    "kl",
    "policy_loss",
    "value_loss",
    "value",
    "clip_fraction",
    "value_clip_fraction",
    "completion_length",
}


def test_a_ppo_run_raises_its_mean_reward_and_saves_its_value_head(peaked_model_dir, tmp_path):
    rec = Recorder()
    config = ppo_config(peaked_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=16, ppo_kl_coef=0.0)
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed"
    steps = rec.of("step")
    rewards = [s.metrics["reward"] for s in steps]
    assert sum(rewards[:4]) / 4 < 0.3 and sum(rewards[-4:]) / 4 > 0.8, rewards
    for s in steps:
        assert FIGURES <= set(s.metrics), s.metrics
        assert s.metrics["kl"] == 0.0 and 1 <= s.metrics["completion_length"] <= 2
    assert steps[0].metrics["value"] == 0.0  # the value head starts at zero
    assert any("explained_variance" in s.metrics for s in steps)
    # one rollouts event per step, 8 answers to each of 4 prompts; an advantage is its answer's mean whitened one
    rollouts = rec.of("rollouts")
    assert [r.step for r in rollouts] == [s.step for s in steps]
    first = rollouts[0].items
    assert len(first) == 32 and sorted({i["group"] for i in first}) == [0, 1, 2, 3]
    assert all(i["reward"] == (1.0 if any("a" <= c <= "z" for c in i["completion"]) else 0.0) for i in first)
    assert steps[0].metrics["reward"] == pytest.approx(sum(i["reward"] for i in first) / 32)
    # the value head beside the adapter: trained away from zero, with its description
    adapter = result.adapter_dir
    from safetensors.torch import load_file

    head = load_file(str(adapter / VALUE_HEAD_WEIGHTS))
    assert head["weight"].shape == (1, 64) and head["weight"].abs().sum() > 0
    info = json.loads((adapter / VALUE_HEAD_INFO).read_text(encoding="utf-8"))
    assert info["hidden_size"] == 64 and info["format"] == "finetune-studio value head"


def test_a_run_started_from_a_ppo_adapter_reads_its_value_head(peaked_model_dir, tmp_path):
    """``init_adapter`` on a PPO run's adapter starts the value head from the saved one: the values of the first
    sampled answers (kept in the checkpoint of step 1) are the saved adapter and head's, recomputed here with PEFT.
    The same adapter without the head's files samples the same answers (same adapter, same seed) with values 0."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = write_sft(tmp_path / "d.jsonl")
    first = train_run(ppo_config(peaked_model_dir, data, max_steps=6, ppo_kl_coef=0.0))
    bare = tmp_path / "bare"
    shutil.copytree(first.adapter_dir, bare)
    for name in (VALUE_HEAD_WEIGHTS, VALUE_HEAD_INFO):
        (bare / name).unlink()
    runs, kept = {}, {}
    for name, start in (("with", first.adapter_dir), ("bare", bare)):
        rec, stop = Recorder(), StopFlag()

        def stop_at_one(event, rec=rec, stop=stop):
            rec(event)
            if event.type == "step":
                stop.set()

        config = ppo_config(
            peaked_model_dir, data, max_steps=4, ppo_epochs=2, init_adapter=str(start), packing=False, lora_dropout=0.0
        )
        result = train_run(config, reporter=Reporter(extra=stop_at_one), stop=stop)
        state = torch.load(result.run_dir / "checkpoints" / "step-000001" / "grpo_state-rank0.pt", weights_only=True)
        runs[name], kept[name] = rec, state["kept"]
    completions = {n: [i["completion"] for i in r.of("rollouts")[0].items] for n, r in runs.items()}
    assert completions["with"] == completions["bare"]
    assert runs["bare"].of("step")[0].metrics["value"] == 0.0 and not kept["bare"][0]["old_values"].any()
    # the values the run sampled with, recomputed from the saved folder: the adapter's hidden states, the head
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaked_model_dir), str(first.adapter_dir))
    model.eval()
    head = load_file(str(first.adapter_dir / VALUE_HEAD_WEIGHTS))
    decoder = model.get_base_model().get_decoder()
    for batch in kept["with"]:
        with torch.no_grad():
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        at_answers = hidden[:, :-1][batch["labels"][:, 1:] != -100]  # the positions that predict answer tokens
        want = at_answers @ head["weight"][0] + head["bias"][0]
        assert batch["old_values"].tolist() == pytest.approx(want.tolist(), abs=1e-5)
        assert batch["old_values"].abs().sum() > 0


@pytest.mark.parametrize("packing", [False, True])
def test_resume_reproduces_the_uninterrupted_curve(tiny_model_dir, tmp_path, packing):
    """Stopped at step 3 (with 2 epochs: in the middle of a batch of answers) and resumed, the run samples the same
    answers and trains the same steps: the sampler, the kept answers with their values and advantages, and the
    value head (weights and optimizer state) come back from the checkpoint."""
    config = ppo_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        max_steps=6,
        batch_size=2,
        gradient_accumulation_steps=2,
        ppo_samples_per_prompt=2,
        ppo_max_new_tokens=4,
        ppo_kl_coef=0.1,
        ppo_epochs=2,
        packing=packing,
        lora_dropout=0.1,
        learning_rate=1e-2,
        rewards=[{"kind": "regex", "pattern": "[a-z]"}, {"kind": "length", "max_chars": 6, "weight": 0.5}],
    )
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    stop, first = StopFlag(), Recorder()

    def stop_at_three(event):
        first(event)
        if event.type == "step" and event.step == 3:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_three), stop=stop)
    assert stopped.status == "stopped" and stopped.step == 3
    checkpoint = stopped.run_dir / "checkpoints" / "step-000003"
    assert (checkpoint / "grpo_state-rank0.pt").is_file() and (checkpoint / VALUE_HEAD_WEIGHTS).is_file()
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert resumed.status == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)
    names = sorted(FIGURES - {"reward/letter"})
    curve = [s.metrics[k] for s in first.of("step") + second.of("step") for k in names]
    assert curve == pytest.approx([s.metrics[k] for s in full.of("step") for k in names], abs=1e-6)
    answers = [[i["completion"] for i in r.items] for r in first.of("rollouts") + second.of("rollouts")]
    assert answers == [[i["completion"] for i in r.items] for r in full.of("rollouts")]
    assert [r.step for r in full.of("rollouts")] == [1, 3, 5]
    steps = full.of("step")
    assert any(s.metrics["kl"] > 0 for s in steps)  # the policy moved away from the reference
    assert any(s.metrics["clip_fraction"] > 0 or s.metrics["value_clip_fraction"] > 0 for s in steps[1::2])


# --- the memory estimate --------------------------------------------------------------------------------------------


def test_the_memory_estimate_covers_ppo():
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory.estimate import (
        DataLengths,
        ModelShape,
        estimate_training_memory,
        rollout_bytes,
        value_head_bytes,
    )

    gpu = DeviceInfo("cuda", "Test GPU", 8 * 2**30, 8 * 2**30, True)
    shape = ModelShape.for_model_spec("default")  # SmolLM2-135M: hidden 576, 30 layers, kv 3 x 64, V 49152
    rewards = [{"kind": "json_valid"}]
    lengths = DataLengths.of_rows([100, 80, 60, 40], [20, 15, 10, 5])
    settings = dict(batch_size=2, max_length=512, packing=False, compute_dtype="bfloat16", rewards=rewards)
    grpo = estimate_training_memory(
        shape, TrainConfig(objective="grpo", grpo_group_size=4, grpo_max_new_tokens=64, **settings), gpu, lengths
    )
    ppo_cfg = TrainConfig(objective="ppo", ppo_samples_per_prompt=4, ppo_max_new_tokens=64, **settings)
    ppo = estimate_training_memory(shape, ppo_cfg, gpu, lengths)
    # the same sampled batch as GRPO's with the same answers per prompt and length
    assert (ppo.batch.rows, ppo.batch.seq, ppo.batch.trained_tokens) == (8, 100 + 64, 8 * 64)
    assert "2 prompts x 4 sampled answers of up to 64 tokens" in ppo.batch.description
    # the value head: h + 1 trainable float32 parameters, their AdamW states, and per answer token its float32 input
    # copy and the per-token figures
    head = shape.hidden_size + 1
    assert ppo.trainable_params == grpo.trainable_params + head
    assert ppo.optimizer_states == grpo.optimizer_states + 8 * head
    assert ppo.adapter_weights == grpo.adapter_weights + 4 * head  # float32 head, as the adapter's (ADAPTER_BYTES)
    assert value_head_bytes(shape, 8 * 64, 2) == 8 * 64 * (4 * 576 + 32)
    assert ppo.logits == grpo.logits + value_head_bytes(shape, 8 * 64, 2)
    # the sampling phase: 8 rows' KV cache and next-token scores; the reference pass adds nothing at the peak
    step = ppo.activations + ppo.logits + ppo.gradients
    assert ppo.rollouts == max(0, rollout_bytes(shape, ppo_cfg, 164, 2) - step)
    assert rollout_bytes(shape, ppo_cfg, 164, 2) == 2 * 30 * 8 * 164 * 192 * 2 + 8 * 49152 * (2 + 16)
    assert ppo.reference_forward == 0 and ppo.total_bytes == sum(ppo.terms.values()) > grpo.total_bytes
