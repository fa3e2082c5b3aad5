"""An online RL run's rollouts, as a person meets them on a 1024 x 768 screen: open a finished GRPO run from Runs, its
reward charts come forward, the Rollouts tab lists the last step's answers with their rewards, a click shows one in
full, Send to Annotate puts it (paired with its group's most different answer) into Annotate's queue with its run and
step, and a key labels it: the store has the person's pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import off_screen, wait_for

from finetune_studio.core.store import Store

RUN_NAME = "grpo-e2e"
PROMPTS = ["Ann is 31 and lives in Oslo. Give the JSON.", "Bob is 40 and lives in Rome. Give the JSON."]
STEPS = 3
G = 4


def _answer(prompt: int, step: int, i: int) -> str:
    name, age, city = [("Ann", 31, "Oslo"), ("Bob", 40, "Rome")][prompt]
    if i == 0:
        return f'{{"name": "{name}", "age": {age}, "city": "{city}"}}'  # the exact answer
    if i == 1:
        return f'{{"name": "{name}", "age": {age + step}}}'  # valid JSON, a field missing
    if i == 2:
        return f'{{"name": "{name}", "age": {age}, "city": "{city}"'  # not closed
    return f"Sure! {name} is {age} (step {step})."


def _seed_run(home, model: str) -> str:
    """A finished GRPO run as the engine leaves it in the database: its row, each step's figures (the columns and
    GRPO's own by name) and every rollout with its scores (Store.add_rollouts)."""
    store = Store(home / "studio.sqlite3")
    config = {"model": model, "objective": "grpo", "run_name": RUN_NAME, "max_steps": STEPS, "dataset": "demo"}
    run_id = store.create_run(config, run_dir=str(home / "runs" / "grpo-e2e"))
    (home / "runs" / "grpo-e2e").mkdir(parents=True)
    for step in range(1, STEPS + 1):
        items = []
        for p, prompt in enumerate(PROMPTS):
            for i in range(G):
                valid, exact = float(i < 2), float(i == 0)
                reward = valid + exact
                items.append(
                    {
                        "prompt": prompt,
                        "completion": _answer(p, step, i),
                        "reward": reward,
                        "rewards": {"json_valid": valid, "exact_fields": exact},
                        "advantage": (reward - 0.75) / 0.83,
                        "group": p,
                    }
                )
        rewards = [it["reward"] for it in items]
        figures = {
            "reward": sum(rewards) / len(rewards) + 0.1 * step,
            "reward_std": 0.83,
            "reward/json_valid": 0.5 + 0.1 * step,
            "reward/exact_fields": 0.25 + 0.1 * step,
            "kl": 0.002 * step,
            "completion_length": 14.0 - step,
            "clip_fraction": 0.05 / step,
        }
        store.add_metrics(
            run_id,
            "train",
            step,
            {
                "loss": 0.1 / step,
                "lr": 1e-5,
                "grad_norm": 0.4,
                "tokens_per_s": 40.0,
                "elapsed_s": 2.0 * step,
                "metrics": figures,
            },
        )
        store.add_rollouts(run_id, step, items)
    store.update_run(run_id, status="completed", step=STEPS, final_loss=0.1 / STEPS, finished_at=time.time())
    store.close()
    return run_id


def test_a_rollout_of_a_reopened_grpo_run_is_sent_to_annotate_and_labelled(app_factory, tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    run_id = _seed_run(home, str(tiny_model_dir))
    app = app_factory(home=home, size=(1024, 768), settings={"last_config": {"model": str(tiny_model_dir)}}).start()

    # Runs -> open the GRPO run: Train shows its reward charts
    app.key("ctrl+3")
    app.click_row("runsTable", lambda cells: RUN_NAME in cells)
    app.click("runsOpen")
    wait_for(lambda: app.state()["current_tab"].endswith("Train"), 10, "the run opened on Train")
    app.wait_text("runStatus", lambda t: t == "Completed", 30, "the opened run")
    state = app.state()
    charts = ("chart_reward", "chart_kl", "chart_length", "chart_clip")
    assert off_screen(state, charts) == {}, off_screen(state, charts)
    tabs = [t["text"] for t in state["tabs"]]
    assert {"Loss and speed", "Rewards", "Rollouts"} <= set(tabs), tabs
    time.sleep(0.5)
    app.screenshot("1-rewards-1024")

    # Rollouts: the last step's answers, best first, readable on this screen
    app.click_tab("Rollouts")
    table = app.widget("rolloutsTable")
    rows = table["rows"]
    assert len(rows) == len(PROMPTS) * G, [r["cells"] for r in rows]
    assert [r["cells"][0] for r in rows] == [str(STEPS)] * len(rows)
    rewards = [float(r["cells"][2]) for r in rows]
    assert rewards == sorted(rewards, reverse=True) and rewards[0] == 2.0
    shown = ("rolloutsTable", "rolloutDetail", "sendToAnnotate", "rolloutsScope", "rolloutsSummary")
    assert off_screen(app.state(), shown) == {}, off_screen(app.state(), shown)
    assert app.text("rolloutsSummary").startswith(f"8 rollouts of step {STEPS} (24 in all)")

    # a person clicks Bob's answer that is valid JSON but misses a field, reads it in full, sends it
    chosen = _answer(1, STEPS, 1)
    app.click_row("rolloutsTable", lambda cells: cells[-2] == chosen)
    detail = app.wait_text("rolloutDetail", lambda t: chosen in t, 5, "the chosen answer in full")
    assert PROMPTS[1] in detail and "json_valid 1" in detail and "exact_fields 0" in detail
    time.sleep(0.3)
    app.screenshot("2-rollouts-1024")
    app.click("sendToAnnotate")
    wait_for(lambda: app.state()["current_tab"].endswith("Annotate"), 10, "Annotate with the sent answer")

    stored = app.query("SELECT text, run_id, checkpoint, source FROM candidates WHERE run_id = ? ORDER BY text", run_id)
    # its partner: the group's answer whose reward is furthest from its own (1): the exact one (2) and the prose (0)
    # are as far; the first of the group is taken
    partner = _answer(1, STEPS, 0)
    assert stored == sorted(
        [(chosen, run_id, f"step-{STEPS:06d}", "grpo-rollout"), (partner, run_id, f"step-{STEPS:06d}", "grpo-rollout")]
    ), stored
    left, right = app.text("leftAnswer"), app.text("rightAnswer")
    assert {chosen, partner} == {left.strip(), right.strip()}, (left, right)
    assert app.text("labelPosition") == "Pair 1 of 1"
    assert "Sent 2 answers to Annotate" in app.state()["status"]
    time.sleep(0.3)
    app.screenshot("3-annotate-1024")

    # the person labels it: the exact answer is better; the store has their pair for the reward model and DPO
    app.key("a" if left.strip() == partner else "b")
    pairs = app.query(
        "SELECT ch.text, cmp.source FROM comparisons cmp JOIN candidates ch "
        "ON ch.id = CASE cmp.decision WHEN 'a' THEN cmp.candidate_a ELSE cmp.candidate_b END"
    )
    assert pairs == [(partner, f"annotate:rollouts of {RUN_NAME}")], pairs


def _train_grpo(home, model_dir, tmp_path) -> str:
    """A real GRPO run of the tiny model through the engine's command line (3 steps, G = 4, 8 new tokens), into
    ``home``; returns its run id."""
    data = tmp_path / "prompts.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for i in range(6):
            turns = [
                {"role": "user", "content": f"Give {i} as JSON."},
                {"role": "assistant", "content": f'{{"n": {i}}}'},
            ]
            fh.write(json.dumps({"messages": turns}) + "\n")
    config = {
        "model": str(model_dir),
        "dataset": str(data),
        "objective": "grpo",
        "run_name": "grpo-real",
        "max_steps": 3,
        "batch_size": 2,
        "grpo_group_size": 4,
        "grpo_max_new_tokens": 8,
        "rewards": [{"kind": "json_valid"}, {"kind": "length", "max_chars": 12}],
    }
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    env = dict(os.environ, FINETUNE_STUDIO_HOME=str(home), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "train", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    finished = [json.loads(line) for line in done.stdout.splitlines() if '"type":"finished"' in line]
    assert done.returncode == 0 and finished, done.stdout[-3000:] + done.stderr[-3000:]
    return str(finished[0]["run_id"])


def test_a_real_grpo_runs_rollouts_are_shown_and_one_is_sent_to_annotate(app_factory, tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    run_id = _train_grpo(home, tiny_model_dir, tmp_path)
    app = app_factory(home=home, size=(1024, 768), settings={"last_config": {"model": str(tiny_model_dir)}}).start()
    stored = app.query(
        "SELECT position, completion, reward FROM rollouts WHERE run_id = ? AND step = 3 ORDER BY position", run_id
    )
    figures = dict(app.query("SELECT name, value FROM named_metrics WHERE run_id = ? AND step = 3", run_id))
    assert len(stored) >= 4 and {"reward", "kl", "clip_fraction", "reward/json_valid", "reward/length"} <= set(figures)

    app.key("ctrl+3")
    app.click_row("runsTable", lambda cells: "grpo-real" in cells)
    app.click("runsOpen")
    wait_for(lambda: app.state()["current_tab"].endswith("Train"), 10, "the run opened on Train")
    app.wait_text("runStatus", lambda t: t == "Completed", 30, "the opened run")
    assert off_screen(app.state(), ("chart_reward", "chart_kl", "chart_length", "chart_clip")) == {}
    time.sleep(0.5)
    app.screenshot("1-real-rewards-1024")
    app.click_tab("Rollouts")
    rows = app.widget("rolloutsTable")["rows"]
    assert len(rows) == len(stored) and {r["cells"][0] for r in rows} == {"3"}
    shown = sorted(float(r["cells"][2]) for r in rows)
    assert shown == pytest.approx(sorted(float(f"{reward:.3g}") for _, _, reward in stored))

    app.click_row("rolloutsTable", lambda cells: True)  # the best answer of the last step
    detail = app.wait_text("rolloutDetail", lambda t: "Answer:" in t, 5, "the chosen answer")
    chosen = max(stored, key=lambda r: r[2])  # sorted best first, ties in stored order
    assert detail.split("Answer:\n", 1)[1] == chosen[1]
    time.sleep(0.3)
    app.screenshot("2-real-rollouts-1024")
    app.click("sendToAnnotate")
    wait_for(lambda: app.state()["current_tab"].endswith("Annotate"), 10, "Annotate with the sent answer")
    sent = app.query("SELECT text, checkpoint FROM candidates WHERE run_id = ? AND source = 'grpo-rollout'", run_id)
    assert len(sent) == 2 and {c for _, c in sent} == {"step-000003"}, sent
    assert chosen[1].strip() in {t for t, _ in sent}
    answers = {app.text("leftAnswer"), app.text("rightAnswer")}
    assert {t for t, _ in sent} == answers, (answers, sent)
    app.screenshot("3-real-annotate-1024")
