"""GRPO: the advantages and the loss equal the formulas written out; a tiny-model run raises its mean reward under a
deterministic verifier; resume reproduces the uninterrupted curve; the rollouts reach the events and the store."""

from __future__ import annotations

import json
import math

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.protocol import events as ev
from finetune_studio.core.protocol.rollouts import Rollouts
from finetune_studio.core.store import Store
from finetune_studio.engine.train.losses import group_advantages, grpo_loss, grpo_token_losses
from finetune_studio.engine.train.recipe import StopFlag, TrainingFailed, train_run
from finetune_studio.engine.train.reporting import Reporter

# --- the formulas on fixed tensors ---------------------------------------------------------------------------------

REWARDS = [1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0]  # three groups of four; the second all equal


def direct_advantages(rewards: list[float], g: int, scale: bool, eps: float = 1e-4) -> list[float]:
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))  # the sample standard deviation
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_are_each_reward_against_its_group(scale):
    got = group_advantages(torch.tensor(REWARDS), 4, scale=scale)
    assert got.tolist() == pytest.approx(direct_advantages(REWARDS, 4, scale), abs=1e-6)
    assert got[4:8].tolist() == [0.0] * 4  # a group whose answers all score the same teaches nothing


# Five answers of 3, 1, 4, 2 and 2 tokens; their advantages; the policy's, the sampler's and the reference's log-probs.
ROWS = [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 4, 4]
ADVANTAGES = [1.5, -0.7, 0.4, -1.2, 0.0]
LOGPS = [-1.0, -2.0, -0.5, -3.0, -1.2, -0.1, -2.2, -0.9, -1.7, -0.3, -2.5, -1.1]
OLD = [-1.4, -2.0, -0.4, -2.5, -1.0, -0.1, -2.9, -0.95, -1.7, -0.7, -2.2, -1.3]  # ratios in and out of [0.8, 1.2]
REF = [-1.1, -1.8, -0.6, -2.9, -1.5, -0.2, -2.0, -1.0, -1.6, -0.5, -2.4, -1.0]
EPSILON, BETA, MAX_NEW = 0.2, 0.05, 6


def direct_token_terms() -> tuple[list[float], list[float], list[bool]]:
    losses, kls, clipped = [], [], []
    for lp, old, ref, row in zip(LOGPS, OLD, REF, ROWS):
        a = ADVANTAGES[row]
        rho = math.exp(lp - old)
        surrogate = min(rho * a, min(max(rho, 1 - EPSILON), 1 + EPSILON) * a)
        kl = math.exp(ref - lp) - (ref - lp) - 1
        losses.append(-surrogate + BETA * kl)
        kls.append(kl)
        clipped.append((rho < 1 - EPSILON and a < 0) or (rho > 1 + EPSILON and a > 0))
    return losses, kls, clipped


def test_the_token_losses_are_the_clipped_surrogate_plus_the_k3_kl():
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    losses, kl, clipped = grpo_token_losses(
        logps,
        torch.tensor(OLD, dtype=torch.float64),
        torch.tensor(REF, dtype=torch.float64),
        torch.tensor(ADVANTAGES, dtype=torch.float64)[torch.tensor(ROWS)],
        epsilon=EPSILON,
        beta=BETA,
    )
    want_losses, want_kl, want_clipped = direct_token_terms()
    assert losses.tolist() == pytest.approx(want_losses, abs=1e-12)
    assert kl.tolist() == pytest.approx(want_kl, abs=1e-12)
    assert clipped.tolist() == want_clipped
    assert 0 < sum(want_clipped) < len(want_clipped)  # the clip is active for some tokens, not for others
    # a clipped token gives no gradient through its ratio: only the KL term's
    losses.sum().backward()
    for i, is_clipped in enumerate(want_clipped):
        kl_grad = BETA * (1 - math.exp(REF[i] - LOGPS[i]))  # d/dlp of beta * (exp(ref - lp) - (ref - lp) - 1)
        if is_clipped:
            assert logps.grad[i].item() == pytest.approx(kl_grad, abs=1e-12)
        else:
            ratio_grad = -math.exp(LOGPS[i] - OLD[i]) * ADVANTAGES[ROWS[i]]
            assert logps.grad[i].item() == pytest.approx(ratio_grad + kl_grad, abs=1e-12)


def test_without_a_reference_there_is_no_kl_and_with_mu_one_the_ratio_is_one():
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor(ADVANTAGES, dtype=torch.float64)[torch.tensor(ROWS)]
    losses, kl, clipped = grpo_token_losses(logps, logps.detach(), None, adv, epsilon=EPSILON, beta=BETA)
    assert losses.tolist() == pytest.approx((-adv).tolist(), abs=1e-12) and not kl.any() and not clipped.any()
    losses.sum().backward()
    assert logps.grad.tolist() == pytest.approx((-adv).tolist(), abs=1e-12)  # the plain policy gradient


@pytest.mark.parametrize("loss_type", ["sequence", "token", "dr_grpo"])
def test_each_normalisation_equals_its_formula(loss_type):
    token_losses, _, _ = direct_token_terms()
    answers = len(ADVANTAGES)
    if loss_type == "sequence":  # each answer's mean over its tokens, then the mean over answers
        per_answer = [[t for t, r in zip(token_losses, ROWS) if r == i] for i in range(answers)]
        want, denom = sum(sum(p) / len(p) for p in per_answer) / answers, answers
    elif loss_type == "token":  # the sum over every token / the tokens
        want, denom = sum(token_losses) / len(token_losses), len(token_losses)
    else:  # the sum / (answers x max_new_tokens)
        want, denom = sum(token_losses) / (answers * MAX_NEW), answers * MAX_NEW
    got = grpo_loss(torch.tensor(token_losses, dtype=torch.float64), torch.tensor(ROWS), answers, loss_type, denom)
    assert got.item() == pytest.approx(want, abs=1e-12)
    # split over two micro-batches (answers 0-1 and 2-4) over the step's denominator, the parts add up to the whole
    cut = ROWS.index(2)
    first = grpo_loss(
        torch.tensor(token_losses[:cut], dtype=torch.float64), torch.tensor(ROWS[:cut]), 2, loss_type, denom
    )
    rows_rest = torch.tensor(ROWS[cut:]) - 2
    rest = grpo_loss(torch.tensor(token_losses[cut:], dtype=torch.float64), rows_rest, 3, loss_type, denom)
    assert (first + rest).item() == pytest.approx(want, abs=1e-12)


# --- the settings -------------------------------------------------------------------------------------------------


def test_grpo_without_rewards_is_a_config_error_naming_rewards(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as caught:
        tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), objective="grpo")
    assert caught.value.field == "rewards"
    for bad, field in (
        ({"grpo_group_size": 1}, "grpo_group_size"),
        ({"grpo_temperature": 0}, "grpo_temperature"),
        ({"grpo_epsilon": 1.0}, "grpo_epsilon"),
        ({"grpo_beta": -0.1}, "grpo_beta"),
        ({"grpo_loss": "mean"}, "grpo_loss"),
        ({"grpo_updates_per_batch": 0}, "grpo_updates_per_batch"),
        ({"grpo_max_new_tokens": 512, "max_length": 512}, "grpo_max_new_tokens"),
    ):
        with pytest.raises(ConfigError) as caught:
            TrainConfig(objective="grpo", rewards=[{"kind": "json_valid"}], **bad)
        assert caught.value.field == field


# --- runs on the tiny model ----------------------------------------------------------------------------------------

LETTER = [{"kind": "regex", "pattern": "[a-z]", "name": "letter"}]  # 1 when the answer holds a lowercase letter


def grpo_config(model_dir, data, **kw) -> TrainConfig:
    settings = dict(
        objective="grpo",
        rewards=LETTER,
        grpo_group_size=8,
        grpo_max_new_tokens=2,
        batch_size=4,
        learning_rate=3e-2,
        lr_scheduler="constant",
        compute_dtype="float32",
    )
    settings.update(kw)
    return tiny_config(model_dir, data, **settings)


def test_a_grpo_run_raises_its_mean_reward(peaked_model_dir, tmp_path):
    rec = Recorder()
    config = grpo_config(peaked_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=16, grpo_beta=0.0)
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed"
    steps = rec.of("step")
    rewards = [s.metrics["reward"] for s in steps]
    assert sum(rewards[:4]) / 4 < 0.3 and sum(rewards[-4:]) / 4 > 0.8, rewards
    # the figures the Train page charts, on every step
    for s in steps:
        assert {"reward", "reward_std", "reward/letter", "kl", "completion_length", "clip_fraction"} <= set(s.metrics)
        assert s.metrics["reward/letter"] == s.metrics["reward"]  # one function of weight 1: the total is its score
        assert 1 <= s.metrics["completion_length"] <= 2
    # one rollouts event per step: G answers to each of batch_size prompts, with their scores and advantages
    rollouts = rec.of("rollouts")
    assert [r.step for r in rollouts] == [s.step for s in steps]
    first = rollouts[0].items
    assert len(first) == 4 * 8 and sorted({i["group"] for i in first}) == [0, 1, 2, 3]
    for group in range(4):
        scores = [i["reward"] for i in first if i["group"] == group]
        advantages = [i["advantage"] for i in first if i["group"] == group]
        assert advantages == pytest.approx(direct_advantages(scores, 8, True), abs=1e-5)
    assert all(i["reward"] == (1.0 if any("a" <= c <= "z" for c in i["completion"]) else 0.0) for i in first)
    mean_first = sum(i["reward"] for i in first) / len(first)
    assert steps[0].metrics["reward"] == pytest.approx(mean_first)
    # the store keeps every rollout, in order, with its scores
    stored = Store().rollouts(result.run_id)
    assert len(stored) == sum(len(r.items) for r in rollouts)
    assert [(r.step, r.completion, r.reward, r.rewards, r.group) for r in stored[: len(first)]] == [
        (1, i["completion"], i["reward"], i["rewards"], i["group"]) for i in first
    ]
    assert Store().rollouts(result.run_id, since_step=15)[0].step == 16


def test_evaluation_scores_greedy_answers_and_keeps_the_highest_reward(peaked_model_dir, tmp_path):
    """Each evaluation scores the model's greedy answer to every held-out prompt with the run's rewards (the
    weighted total and each function); early stopping's best is the highest eval reward, not the lowest eval loss;
    the last evaluation's reward equals the trained adapter's greedy answers scored directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_studio.core.rewards import RewardSet, parse_rewards
    from finetune_studio.engine.datasets.loader import load_dataset
    from finetune_studio.engine.datasets.split import split_by_prompt

    rewards = [LETTER[0], {"kind": "length", "max_chars": 40, "weight": 0.5, "name": "short"}]
    data = write_sft(tmp_path / "d.jsonl")
    rec = Recorder()
    config = grpo_config(
        peaked_model_dir,
        data,
        max_steps=16,
        grpo_beta=0.0,
        rewards=rewards,
        eval_every=4,
        early_stopping_patience=100,
    )
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed"
    evals = rec.of("eval")
    assert [e.step for e in evals] == [4, 8, 12, 16]
    for e in evals:
        m = e.metrics
        assert m["eval_reward"] == pytest.approx(m["eval_reward/letter"] + 0.5 * m["eval_reward/short"])
        assert 0.0 <= m["eval_reward/letter"] <= 1.0 and 0.0 <= m["eval_reward/short"] <= 1.0
    scores = [e.metrics["eval_reward"] for e in evals]
    assert scores[-1] > scores[0]  # the greedy answers learn to hold a letter, as the sampled ones do
    best = evals[scores.index(max(scores))]  # the first of the highest
    assert evals[-1].best_step == best.step and evals[-1].best_eval_loss == pytest.approx(best.eval_loss)
    for i, e in enumerate(evals):  # an evaluation is the best when it beats every one before it
        assert e.is_best == (i == 0 or e.metrics["eval_reward"] > max(scores[:i]))
    run = Store().get_run(result.run_id)
    assert run.best_step == best.step
    kept = json.loads((result.run_dir / "best" / "trainer_state.json").read_text(encoding="utf-8"))
    assert kept["step"] == best.step and kept["score"] == pytest.approx(-best.metrics["eval_reward"])

    # the last evaluation, recomputed: the final adapter's greedy answers to the held-out prompts, scored
    _, held_out = split_by_prompt(load_dataset(str(data)).examples, config.validation_fraction, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(peaked_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaked_model_dir), result.adapter_dir)
    model.eval()
    prompts, texts = [], []
    for example in held_out:
        user = example.messages[0].content
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        prompts.append(user)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    direct = RewardSet(parse_rewards(rewards)).score(prompts, texts, {"answer": [""] * len(texts)})
    assert evals[-1].metrics["eval_reward"] == pytest.approx(sum(direct.total) / len(texts), abs=1e-6)


@pytest.mark.parametrize("updates,packing", [(1, True), (2, False)])
def test_resume_reproduces_the_uninterrupted_curve(tiny_model_dir, tmp_path, updates, packing):
    """Stopped at step 3 (with mu = 2: in the middle of a batch of answers) and resumed, the run samples the same
    answers and trains the same steps: the sampling generator, the kept answers and their steps left are restored."""
    config = grpo_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        max_steps=6,
        batch_size=2,
        gradient_accumulation_steps=2,
        grpo_group_size=3,
        grpo_max_new_tokens=4,
        grpo_beta=0.1,
        grpo_updates_per_batch=updates,
        packing=packing,  # the answers packed into one row, or padded rows
        grpo_loss="token",
        lora_dropout=0.1,
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
    assert (stopped.run_dir / "checkpoints" / "step-000003" / "grpo_state-rank0.pt").is_file()
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert resumed.status == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)
    names = ("reward", "reward_std", "kl", "clip_fraction", "completion_length")
    curve = [s.metrics[k] for s in first.of("step") + second.of("step") for k in names]
    assert curve == pytest.approx([s.metrics[k] for s in full.of("step") for k in names], abs=1e-6)
    answers = [[i["completion"] for i in r.items] for r in first.of("rollouts") + second.of("rollouts")]
    assert answers == [[i["completion"] for i in r.items] for r in full.of("rollouts")]
    assert [r.step for r in full.of("rollouts")] == ([1, 2, 3, 4, 5, 6] if updates == 1 else [1, 3, 5])
    if updates == 2:  # the second update of a batch measures its ratio against the sampler: some tokens clip
        assert any(s.metrics["clip_fraction"] > 0 for s in full.of("step")[1::2])
    # the store holds each step's rollouts once, the resumed session's replacing none it should keep
    assert [r.step for r in Store().rollouts(stopped.run_id)] == [r.step for r in full.of("rollouts") for _ in r.items]


def test_grpo_from_an_sft_adapter_measures_its_kl_against_that_adapter(tiny_model_dir, tmp_path):
    """Started from a trained adapter, the reference is that adapter's frozen copy: the first step's KL is 0 (the
    policy is the reference before any update), then it grows; the bare base would differ from the start."""
    data = write_sft(tmp_path / "d.jsonl")
    sft = train_run(tiny_config(tiny_model_dir, data, max_steps=4, learning_rate=5e-2, compute_dtype="float32"))
    rec = Recorder()
    config = grpo_config(tiny_model_dir, data, max_steps=3, grpo_beta=0.1, init_adapter=sft.run_id, learning_rate=5e-2)
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed" and Store().get_run(result.run_id).parent_run_id == sft.run_id
    kls = [s.metrics["kl"] for s in rec.of("step")]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[-1] > 1e-6, kls


def test_the_rewards_get_the_prompt_the_reference_answer_and_the_rows_columns(tiny_model_dir, tmp_path):
    """A person's Python reward (TRL's contract, in its sandbox) sees each answer's prompt, the reference answer as
    ``answer`` and the row's other plain columns by name; a reward reading a column the data lacks is refused."""
    rows = [{"prompt": f"Say {i}.", "completion": f"It is {i}.", "level": i % 3} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    script = tmp_path / "score.py"
    script.write_text(
        "def reward(prompts, completions, answer, level, **kw):\n"
        "    return [10.0 * l + (1.0 if a == p.replace('Say', 'It is') else 0.0)"
        " for p, a, l in zip(prompts, answer, level)]\n",
        encoding="utf-8",
    )
    rec = Recorder()
    config = grpo_config(
        tiny_model_dir,
        data,
        max_steps=2,
        grpo_group_size=2,
        validation_fraction=0.0,
        rewards=[{"kind": "python", "path": str(script), "name": "mine"}],
    )
    train_run(config, reporter=Reporter(extra=rec))
    items = [i for r in rec.of("rollouts") for i in r.items]
    assert len(items) == 2 * 4 * 2
    by_prompt = {r["prompt"]: r for r in rows}
    for item in items:
        assert item["reward"] == item["rewards"]["mine"] == 10.0 * by_prompt[item["prompt"]]["level"] + 1.0
    missing = config.replace(rewards=[{"kind": "exact_match", "column": "solution"}])
    failed = Recorder()
    with pytest.raises(TrainingFailed):
        train_run(missing, reporter=Reporter(extra=failed))
    [event] = failed.of("failed")
    assert event.kind == "config" and "rewards" in event.message and "solution" in event.message


# --- the event and the store ------------------------------------------------------------------------------------

ITEMS = [
    {
        "prompt": "p",
        "completion": '{"a": 1}',
        "reward": 1.5,
        "rewards": {"json": 1.0, "len": 0.5},
        "advantage": 0.7,
        "group": 0,
    },
    {
        "prompt": "p",
        "completion": "nope",
        "reward": 0.0,
        "rewards": {"json": 0.0, "len": 0.0},
        "advantage": -0.7,
        "group": 0,
    },
]


def test_the_rollouts_event_round_trips_and_refuses_bad_items():
    event = Rollouts(step=3, items=ITEMS)
    assert ev.parse_event(event.to_json()) == event
    for bad in (
        {**ITEMS[0], "reward": None},
        {**ITEMS[0], "rewards": {"json": "high"}},
        {**ITEMS[0], "group": -1},
        {**ITEMS[0], "completion": 3},
    ):
        line = json.dumps({"v": ev.PROTOCOL_VERSION, "type": "rollouts", "step": 3, "items": [bad]})
        with pytest.raises(ev.ProtocolError, match="item 0"):
            ev.parse_event(line)


def test_the_store_round_trips_rollouts():
    store = Store()
    rid = store.create_run({"model": "default", "objective": "grpo"})
    store.add_rollouts(rid, 1, ITEMS)
    store.add_rollouts(rid, 2, ITEMS[:1])
    store.add_rollouts(rid, 2, ITEMS[1:])  # a step written again (a resumed run) replaces its rows
    rows = Store().rollouts(rid)
    assert [(r.step, r.position, r.group) for r in rows] == [(1, 0, 0), (1, 1, 0), (2, 0, 0)]
    assert rows[0].completion == '{"a": 1}' and rows[0].rewards == {"json": 1.0, "len": 0.5}
    assert (rows[1].reward, rows[1].advantage, rows[2].completion) == (0.0, -0.7, "nope")
    assert [r.step for r in store.rollouts(rid, since_step=1)] == [2]
    store.delete_metrics_after(rid, 1)  # a resumed run drops what it trains again
    assert [r.step for r in store.rollouts(rid)] == [1, 1]


# --- the memory estimate --------------------------------------------------------------------------------------------


def test_the_memory_estimate_covers_grpo():
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory.estimate import (
        DataLengths,
        ModelShape,
        estimate_training_memory,
        rollout_bytes,
    )
    from finetune_studio.core.protocol.memory_report import memory_report

    gpu = DeviceInfo("cuda", "Test GPU", 8 * 2**30, 8 * 2**30, True)
    shape = ModelShape.for_model_spec("default")  # SmolLM2-135M: 30 layers, keys and values 3 heads x 64, V 49152
    rewards = [{"kind": "json_valid"}]
    lengths = DataLengths.of_rows([100, 80, 60, 40], [20, 15, 10, 5])
    settings = dict(batch_size=2, max_length=512, packing=False, compute_dtype="bfloat16")
    sft = estimate_training_memory(shape, TrainConfig(**settings), gpu, lengths)
    grpo_cfg = TrainConfig(objective="grpo", rewards=rewards, grpo_group_size=8, grpo_max_new_tokens=64, **settings)
    grpo = estimate_training_memory(shape, grpo_cfg, gpu, lengths)
    # the step trains batch_size x G answers: prompt (at most the longest row) + the answers' tokens
    assert (grpo.batch.rows, grpo.batch.seq, grpo.batch.trained_tokens) == (16, 100 + 64, 16 * 64)
    assert "2 prompts x 8 sampled answers of up to 64 tokens" in grpo.batch.description
    assert grpo.activations > 4 * sft.activations and grpo.total_bytes > sft.total_bytes
    assert grpo.total_bytes == sum(grpo.terms.values())
    # the sampling phase: its KV cache and next-token scores, written out
    assert rollout_bytes(shape, grpo_cfg, 164, 2) == 2 * 30 * 16 * 164 * 192 * 2 + 16 * 49152 * (2 + 16)
    step = grpo.activations + grpo.logits + grpo.gradients
    assert grpo.rollouts == max(0, rollout_bytes(shape, grpo_cfg, 164, 2) - step)
    # a deep model without grouped keys and values, its step's activations recomputed: the sampling phase's KV cache is
    # then the larger, and the estimate is its peak instead of the step's
    mha = ModelShape.from_config_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 1024,
            "num_hidden_layers": 80,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "intermediate_size": 2816,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        }
    )
    light = grpo_cfg.replace(gradient_checkpointing=True, grpo_group_size=16, grpo_max_new_tokens=400)
    small = estimate_training_memory(mha, light, gpu, lengths)
    capacity = min(512, 100 + 400)
    step = small.activations + small.logits + small.gradients
    assert small.rollouts == rollout_bytes(mha, light, capacity, 2) - step > 0
    # the report the app shows counts it with the activations
    report = memory_report(mha, light, gpu, lengths)
    assert report.terms["rollouts"] == small.rollouts and report.total_bytes == small.total_bytes
