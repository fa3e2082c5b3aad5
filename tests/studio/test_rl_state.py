"""The Train page's online-RL state without Qt: GRPO's figures by step, the rollouts (sorting, the latest step, a
resume), and Send to Annotate writing the preference store and a session that Annotate's own state reads back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests_rl_support import rollouts_event

from finetune_studio.core.protocol.events import Eval, Started, Step
from finetune_studio.core.store import Store
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.annotate import AnnotateState, Key
from finetune_studio.studio.state.rl_figures import StepFigures
from finetune_studio.studio.state.rollouts import Rollout, Rollouts, SendError, send_to_annotate, session_name
from finetune_studio.studio.state.run import RunState


def _step(step: int, **metrics: float) -> Step:
    return Step(
        step=step,
        total_steps=10,
        loss=0.1,
        lr=1e-4,
        grad_norm=1.0,
        tokens_per_s=100.0,
        memory_used_bytes=1,
        memory_peak_bytes=1,
        metrics=metrics,
    )


def _items(prompt: str, rewards: list[float], group: int = 0) -> list[dict]:
    return [
        {
            "prompt": prompt,
            "completion": f"answer {prompt[:6]} {i} r={r}",
            "reward": r,
            "rewards": {"json_valid": 1.0 if r > 0 else 0.0, "exact": r / 2},
            "advantage": r - sum(rewards) / len(rewards),
            "group": group,
        }
        for i, r in enumerate(rewards)
    ]


def test_grpo_figures_become_columns_by_name_and_follow_a_resume():
    state = RunState()
    state.apply(_step(1, reward=0.5, reward_std=0.1, kl=0.0, **{"reward/json_valid": 1.0}))
    state.apply(_step(2, reward=0.7, reward_std=0.2, kl=0.01, completion_length=12, clip_fraction=0.05))
    state.apply(_step(3, reward=0.9, kl=0.02, **{"reward/json_valid": 1.0, "reward/exact": 0.8}))
    figures = state.figures
    assert figures.reward_functions() == ["json_valid", "exact"] and figures.has_rl
    assert list(figures.steps()) == [1, 2, 3]
    assert list(figures.column("reward")) == [0.5, 0.7, 0.9]
    exact = figures.column("reward/exact")  # a function first seen at step 3: NaN before
    assert math.isnan(exact[0]) and math.isnan(exact[1]) and exact[2] == 0.8
    assert figures.last("completion_length") == 12 and figures.last("reward_std") == 0.2
    assert np.isnan(figures.column("never_sent")).all() and figures.last("never_sent") is None

    # a resume from step 1 re-trains steps 2 and 3: their figures go, the new ones follow
    state.apply(Started(run_id="r", run_dir="d", total_steps=10, resumed_from_step=1))
    assert list(figures.steps()) == [1]
    state.apply(_step(2, reward=0.6))
    assert list(figures.column("reward")) == [0.5, 0.6]
    # a step sent again without a resume (the engine re-trains it): the later steps go too
    state.apply(_step(3, reward=0.8))
    state.apply(_step(2, reward=0.65))
    assert list(figures.steps()) == [1, 2] and figures.last("reward") == 0.65


def test_reward_model_accuracy_and_gap_come_from_the_evaluations_under_either_name():
    state = RunState()
    state.apply(Eval(step=5, eval_loss=0.6, metrics={"accuracy": 0.7, "gap": 0.4}))
    state.apply(Eval(step=10, eval_loss=0.5, metrics={"accuracy": 0.9, "gap": 1.1}))
    assert state.eval_figures.first_of(("pair_accuracy", "accuracy")) == "accuracy"
    assert list(state.eval_figures.column("gap")) == [0.4, 1.1]
    assert not state.figures.has_rl


def test_history_loads_named_figures_after_the_columns():
    f = StepFigures()
    f.extend({2: {"reward": 1.0}, 1: {"reward": 0.5, "kl": 0.1}, 3: {}})
    assert list(f.steps()) == [1, 2] and list(f.column("kl"))[0] == 0.1 and math.isnan(f.column("kl")[1])
    many = {s: {"reward": float(s)} for s in range(3, 3000)}
    f.extend(many)  # past the columns' first capacity
    assert f.n == 2999 and f.last("reward") == 2999.0


def test_rollouts_sort_by_any_score_and_show_the_latest_step_or_all():
    r = Rollouts()
    seen = []
    r.subscribe(seen.append)
    r.add(1, _items("P one", [0.0, 1.0, 0.5]))
    r.add(2, _items("P two", [2.0, -1.0]) + _items("P three", [0.25, math.nan], group=1))
    assert len(r) == 7 and r.last_step == 2 and seen == ["rollouts", "rollouts"]
    assert r.functions == ["json_valid", "exact"]
    latest = r.view("latest", "reward", descending=True)
    assert [x.reward for x in latest[:3]] == [2.0, 0.25, -1.0] and math.isnan(latest[3].reward)  # NaN last
    assert [x.step for x in r.view("all", "step", descending=False)] == [1, 1, 1, 2, 2, 2, 2]
    ascending = r.view("all", "reward/exact", descending=False)
    assert [x.rewards["exact"] for x in ascending[:2]] == [-0.5, 0.0]
    assert [x.prompt for x in r.view("all", "prompt", descending=False)][:3] == ["P one"] * 3
    by_length = r.view("all", "length", descending=True)
    assert len(by_length[0].completion) >= len(by_length[-1].completion)
    assert [x.index for x in r.group_of(latest[0])] == [0, 1]
    with pytest.raises(ValueError, match="cannot sort"):
        r.view("all", "colour")

    r.add(2, _items("P two", [3.0]))  # step 2 again (a resumed run samples it again): it replaces the old step 2
    assert len(r) == 4 and r.view("latest")[0].reward == 3.0
    r.truncate_after(1)
    assert {x.step for x in r.rows} == {1}


def test_rollouts_are_read_from_stored_rows_and_events_alike():
    state = RunState()
    state.apply(rollouts_event(4, _items("P", [1.0, 0.0])))
    assert [x.key for x in state.rollouts.rows] == [(4, 0), (4, 1)]
    stored = {"step": 5, "position": 3, "prompt": "Q", "completion": "A", "reward": "0.5", "rewards": '{"f": 1}'}
    row = Rollout.of(-1, 0, stored)
    assert (row.step, row.index, row.reward, row.rewards, row.advantage) == (5, 3, 0.5, {"f": 1.0}, 0.0)
    damaged = Rollout.of(6, 2, {"prompt": "Q", "completion": "A", "reward": None, "rewards": "[1, 2]"})
    assert (damaged.step, damaged.index, math.isnan(damaged.reward), damaged.rewards) == (6, 2, True, {})
    state.reset()
    assert len(state.rollouts) == 0


def test_send_to_annotate_writes_candidates_with_their_run_and_step_and_annotate_shows_the_pairs(studio_home):
    store = Store()
    prefs = store.preferences
    r = Rollouts()
    r.add(7, _items("Give the JSON for Ann, 31.", [1.0, 0.2, 0.6, 0.2]))
    chosen = [x for x in r.rows if x.index in (0, 1, 2)]
    sent = send_to_annotate(prefs, chosen, run_id="run-abc", run_name="grpo/demo", model="tiny", group=r.rows)
    assert sent.session == session_name("grpo/demo", "run-abc") == "rollouts of grpo-demo"
    assert (sent.candidates, sent.items) == (3, 2) and "2 pairs to label" in sent.message
    rows = prefs.conn.execute("SELECT text, run_id, checkpoint, source, adapter, model FROM candidates").fetchall()
    assert sorted(t for t, *_ in rows) == sorted(x.completion for x in chosen)
    assert {tuple(rest) for _, *rest in rows} == {("run-abc", "step-000007", "grpo-rollout", "run-abc", "tiny")}
    (source,) = prefs.conn.execute("SELECT source FROM prompts").fetchone()
    assert source == "rollouts:run-abc"

    # Annotate's own state opens the session: the pairs neighbour each other in reward order (1.0-0.6, 0.6-0.2)
    annotate = AnnotateState()
    annotate.use(prefs, an.SessionSpec.load(sent.session))
    assert len(annotate.items) == 2 and annotate.spec.prompts == ["Give the JSON for Ann, 31."]
    texts = {frozenset(prefs.candidate(c)["text"] for c in (i.a, i.b)) for i in annotate.items}
    by_reward = {x.reward: x.completion for x in chosen}
    assert texts == {frozenset((by_reward[1.0], by_reward[0.6])), frozenset((by_reward[0.6], by_reward[0.2]))}
    annotate.press(Key.LEFT)  # a person's decision becomes a DPO pair of the store
    assert len(prefs.pairs()) == 1

    # sending the same answers again adds nothing; one more prompt joins the same session
    again = send_to_annotate(prefs, chosen, run_id="run-abc", run_name="grpo/demo", model="tiny", group=r.rows)
    assert again.items == 0 and again.message.startswith("Already in Annotate")
    r.add(8, _items("Another prompt", [0.0, 1.0]))
    (single,) = [x for x in r.rows if x.step == 8 and x.reward == 0.0]
    one = send_to_annotate(prefs, [single], run_id="run-abc", run_name="grpo/demo", group=r.group_of(single))
    assert one.items == 1 and one.partner is not None and one.partner.reward == 1.0 and "paired with" in one.message
    spec = an.SessionSpec.load(sent.session)
    assert spec.prompts == ["Give the JSON for Ann, 31.", "Another prompt"] and len(spec.items) == 3

    # another run under the same name gets a session of its own (its adapter is the one a DPO run starts from)
    other = send_to_annotate(prefs, chosen, run_id="run-xyz", run_name="grpo/demo", group=r.rows)
    assert other.session == "rollouts of grpo-demo (run-xyz)" and other.items == 2
    assert an.SessionSpec.load(other.session).side_a.init_adapter == "run-xyz"
    assert len(an.SessionSpec.load(sent.session).items) == 3


def test_send_to_annotate_refuses_what_cannot_be_labelled_with_what_to_do(studio_home):
    prefs = Store().preferences
    r = Rollouts()
    r.add(1, _items("First prompt", [1.0, 0.0]) + _items("Second prompt", [1.0], group=1))
    with pytest.raises(SendError, match="Select one or more"):
        send_to_annotate(prefs, [], run_id="r")
    with pytest.raises(SendError, match="2 different prompts: select answers to one prompt"):
        send_to_annotate(prefs, [r.rows[0], r.rows[2]], run_id="r")
    lonely = r.rows[2]
    with pytest.raises(SendError, match="select a second answer"):
        send_to_annotate(prefs, [lonely], run_id="r", group=r.group_of(lonely))
    assert prefs.stats()["candidates"] == 0 and an.list_sessions() == []  # nothing half-written


def test_the_sorted_view_follows_added_rollouts_exactly_as_a_fresh_sort_would():
    import random

    rnd = random.Random(3)
    r = Rollouts()
    sv = r.sorted_view()

    def check() -> None:
        assert [x.key for x in sv.update()] == [x.key for x in r.view(sv.scope, sv.sort, sv.descending, step=sv.step)]

    for scope, sort, descending in (
        ("all", "reward", True),
        ("all", "reward/exact", False),
        ("latest", "length", True),
    ):
        sv.scope, sv.sort, sv.descending = scope, sort, descending
        for step in range(1, 30):
            rewards = [rnd.choice([0.0, 0.5, 1.0, math.nan]) for _ in range(5)]  # ties and NaN scores
            r.add(len(r.rows) and r.last_step + 1 or 1, _items(f"P{step % 3}", rewards, group=step % 2))
            check()
            if step == 10:
                sv.step = r.last_step - 2  # a step held while rows are selected
                check()
            if step == 20:
                sv.step = None
                r.truncate_after(r.last_step - 3)  # a resume: rows taken away
                check()
    sv.sort = "prompt"
    check()
    sv.scope, sv.sort, sv.step = "all", "reward", None
    built = sv.update()
    r.add(r.last_step + 1, _items("P", [0.25, 2.0]))
    assert sv.update() is built and built[0].reward == 2.0  # the new rows inserted, not a new sort
    check()
