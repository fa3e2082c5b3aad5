"""``demo --rl``: SFT, the loop's DPO and GRPO with the task's verifier, end to end on the tiny model."""

from __future__ import annotations

import json

from finetune_studio.core.protocol.demo_report import DemoRLReport
from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.store import Store
from finetune_studio.engine.demo import rl

TINY = ["--sft-steps", "1", "--max-length", "256", "--eval-limit", "1", "--max-new-tokens", "3", "--skip-before"]
GRPO = ["--grpo-steps", "2", "--grpo-prompts", "2", "--grpo-accumulation", "1", "--group-size", "2"]
GRPO += ["--grpo-max-new-tokens", "4"]


def test_demo_rl_runs_end_to_end_on_the_tiny_model(tiny_model_dir, capsys):
    argv = ["--model", str(tiny_model_dir), *TINY, *GRPO, "--dpo-steps", "1", "--dpo-prompts", "2", "--json"]
    assert rl.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1
    typed = parse_event(out[0])  # one typed, versioned event
    assert isinstance(typed, DemoRLReport)
    for score in (typed.after_sft, typed.after_grpo):
        assert score is not None and score.n == 1 and 0 <= score.exact <= score.valid <= 1
    assert typed.before is None  # --skip-before
    assert typed.eval_prompts == 1
    # the tiny model's candidates all score 0: no pairs, so the loop's DPO is left out and said to be
    assert typed.pairs == 0 and typed.after_dpo is None and typed.dpo_run == ""
    assert "no pairs, so no DPO" in captured.err
    # GRPO's curves: one value per step for each figure the objective reports, the rewards by name
    for key in ("reward", "reward_std", "kl", "completion_length", "clip_fraction", "reward/fields", "reward/exact"):
        assert len(typed.curves[key]) == 2, key
    assert all(0 <= r <= 1 for r in typed.curves["reward"])  # the exact reward: 0 or 1 an answer
    assert all(0 < n <= 4 for n in typed.curves["completion_length"])
    # one evaluation on the validation prompts (held out of GRPO's training prompts), at step 2: the step scored
    assert typed.curves["eval_step"] == [2.0] and 0 <= typed.curves["eval_reward"][0] <= 1
    assert typed.grpo_best_step == 2
    assert set(typed.seconds) >= {"sft", "dpo", "grpo", "score_after SFT", "score_after GRPO"}
    assert typed.settings["group_size"] == 2 and typed.settings["grpo_steps"] == 2
    # GRPO started from the SFT run's adapter, DPO too (the loop's DPO), and the rollouts are kept with the run
    store = Store()
    try:
        grpo = store.find_run(typed.grpo_run)
        assert grpo is not None and grpo.status == "completed" and grpo.objective == "grpo"
        assert grpo.parent_run_id == typed.sft_run
        assert json.loads(grpo.config)["rewards"] == rl.REWARDS
        rollouts = store.rollouts(typed.grpo_run)
        assert len(rollouts) == 2 * 2 * 2  # steps x prompts x G
    finally:
        store.close()


def test_demo_rl_without_dpo_prints_the_summary_and_rescores_earlier_runs(tiny_model_dir, capsys):
    assert rl.main(["--model", str(tiny_model_dir), *TINY, *GRPO, "--no-dpo"]) == 0
    out = capsys.readouterr().out
    assert "after SFT" in out and "after GRPO" in out and "after DPO" not in out
    assert "mean reward by step" in out
    store = Store()
    try:
        sft, grpo = sorted((r for r in store.list_runs()), key=lambda r: r.objective != "sft")[:2]
    finally:
        store.close()
    assert (sft.objective, grpo.objective) == ("sft", "grpo")
    # the same runs again, scored without training: the same scores, and GRPO's curves read back from the store
    again = ["--model", str(tiny_model_dir), *TINY, "--no-dpo", "--sft-run", sft.id, "--grpo-run", grpo.id, "--json"]
    assert rl.main(again) == 0
    typed = parse_event(capsys.readouterr().out.strip())
    assert isinstance(typed, DemoRLReport) and (typed.sft_run, typed.grpo_run) == (sft.id, grpo.id)
    assert "grpo" not in typed.seconds and "sft" in typed.seconds  # nothing trained
    assert len(typed.curves["reward"]) == 2 and len(typed.curves["loss"]) == 2
    assert f"{typed.after_grpo.exact:6.1%} exact" in out


def test_the_demo_reward_is_the_exact_answer_and_gives_a_made_up_job_nothing():
    """GRPO's reward is the held-out score's test: 1 for the expected object, 0 for anything else, a made-up job
    (three fields of four right) included; the share of fields right is watched with weight 0."""
    from finetune_studio.core.rewards import RewardSet

    expected = {"name": "Mei Weber", "age": 77, "city": "Dublin", "job": None}
    answers = [
        json.dumps(expected),
        json.dumps({**expected, "job": "born"}),  # the SFT model's commonest error
        json.dumps({**expected, "age": "77"}),  # a string is not the number
        "not json",
    ]
    with RewardSet(rl.REWARDS) as rewards:
        scores = rewards.score(["p"] * 4, answers, {"answer": [json.dumps(expected)] * 4})
    assert scores.total == [1.0, 0.0, 0.0, 0.0]
    assert scores.by_function["fields"] == [1.0, 0.75, 0.75, 0.0]


def test_demo_rl_refuses_a_bad_setting_naming_it(tiny_model_dir, capsys):
    assert rl.main(["--model", str(tiny_model_dir), *TINY, "--no-dpo", "--group-size", "1"]) == 2
    assert "grpo_group_size" in capsys.readouterr().err


def test_demo_rl_holds_validation_prompts_out_of_grpo_to_choose_its_step(tmp_path):
    args = rl.build_parser().parse_args(["--grpo-validation", "20", "--grpo-eval-every", "3", "--grpo-steps", "9"])
    _, grpo = rl._configs(args, tmp_path / "prompts.jsonl", training_prompts=400)
    assert grpo.validation_fraction == 20 / 400 and grpo.max_eval_examples == 20 and grpo.eval_every == 3
    assert grpo.early_stopping_patience == 9  # the best step is kept; the run never stops early
    off = rl.build_parser().parse_args(["--grpo-validation", "0"])
    _, plain = rl._configs(off, tmp_path / "prompts.jsonl", training_prompts=400)
    assert (plain.validation_fraction, plain.eval_every, plain.early_stopping_patience) == (0.0, 0, 0)


def test_demo_rl_accumulates_batches_of_prompts_into_one_step(tmp_path):
    args = rl.build_parser().parse_args(["--grpo-prompts", "4", "--grpo-accumulation", "2"])
    _, grpo = rl._configs(args, tmp_path / "prompts.jsonl")
    assert (grpo.batch_size, grpo.gradient_accumulation_steps) == (4, 2)


def test_demo_rl_is_chosen_by_the_command_line():
    import subprocess

    from finetune_studio.core.paths import python_argv

    out = subprocess.run(
        [*python_argv(), "-m", "finetune_studio.engine", "demo", "--rl", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "demo --rl" in out.stdout and "--group-size" in out.stdout and "--dpo-run" in out.stdout
