"""Annotate's queue ordered by a model's predictions, without Qt: each order on fixed rewards, the moves after a
decision following the queue, the agreement over the last decisions, and no prediction shown before a decision."""

from __future__ import annotations

import json

import pytest

from finetune_studio.core.label_queue import LAST_DECISIONS, Agreement
from finetune_studio.core.store import Store
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.annotate import AnnotateState, Key

# Answer texts carry their reward: "p<i> a=<ra>" / "p<i> b=<rb>"; the gaps |ra - rb| per item: 1.0, 0.1, 3.0, 0.5
REWARDS = [(1.0, 0.0), (0.2, 0.3), (-1.0, 2.0), (0.5, 0.0)]
SCORER = an.Scorer("reward_model", "/models/rm", name="rm")


def fixed_scores(prompt: str, answers: list[str]) -> list[float]:
    return [float(a.split("=")[1]) for a in answers]


@pytest.fixture
def store():
    s = Store()
    yield s
    s.close()


def _session(prefs, rewards=REWARDS, name="order", annotator="ann") -> an.SessionSpec:
    spec = an.SessionSpec(name, [f"p{i}" for i in range(len(rewards))], an.Side(seed=1), an.Side(seed=2))
    spec.annotator = annotator
    for i, (ra, rb) in enumerate(rewards):
        pid = prefs.add_prompt(f"p{i}", source=spec.source)
        spec.items.append(
            an.Item(pid, prefs.add_candidate(pid, f"p{i} a={ra}"), prefs.add_candidate(pid, f"p{i} b={rb}"))
        )
    spec.save()
    return spec


def _scored(prefs, order: str, **kw) -> tuple[AnnotateState, an.SessionSpec]:
    spec = _session(prefs, **kw)
    st = AnnotateState()
    st.use(prefs, spec)
    st.set_scorer(SCORER)
    assert st.score_with(fixed_scores) == len(spec.items)
    st.set_order(order)
    return st, spec


def test_as_added_and_random_need_no_scorer(store):
    spec = _session(store.preferences, rewards=[(0, 1)] * 12)
    st = AnnotateState()
    st.use(store.preferences, spec)
    assert st.order == "added" and st.queue == list(range(12)) and st.index == 0
    st.set_order("random")
    assert sorted(st.queue) == list(range(12)) and st.queue != list(range(12)) and st.index == st.queue[0]
    again = AnnotateState()
    again.use(store.preferences, an.SessionSpec.load("order"))  # reopened: the same order, the same shuffle
    assert again.order == "random" and again.queue == st.queue
    assert st.to_score() == [] and "Choose a scorer" not in st.message


def test_least_sure_first_orders_by_the_smallest_predicted_gap(store):
    st, spec = _scored(store.preferences, "least_sure")
    assert st.queue == [1, 3, 0, 2] and st.index == 1 and st.position == 0
    st.press(Key.LEFT)  # a decision moves to the next pair of the queue
    assert st.index == 3
    st.press(Key.NEXT)
    assert st.index == 0
    st.press(Key.PREVIOUS)
    st.press(Key.PREVIOUS)
    assert st.index == 1
    st.press(Key.PREVIOUS)  # the queue's first stays the first
    assert st.index == 1


def test_largest_gap_first_orders_by_the_largest_predicted_gap(store):
    st, _ = _scored(store.preferences, "largest_gap")
    assert st.queue == [2, 0, 3, 1] and st.index == 2


def test_decisions_wrap_around_to_the_first_open_pair_of_the_queue(store):
    st, spec = _scored(store.preferences, "least_sure")
    st.press(Key.NEXT)  # at item 3, the queue's second
    st.press(Key.TIE)  # -> item 0, then item 2, then around to item 1
    st.press(Key.SKIP)
    assert st.index == 2
    st.press(Key.BOTH_BAD)
    assert st.index == 1 and st.labeller.state(spec.items[1]).decision == ""


def test_an_order_by_predictions_without_a_scorer_says_what_to_do(store):
    spec = _session(store.preferences)
    st = AnnotateState()
    st.use(store.preferences, spec)
    st.set_order("least_sure")
    assert "Choose a scorer" in st.message and st.queue == [0, 1, 2, 3]  # unscored pairs keep the added order
    with pytest.raises(ValueError, match="unknown queue order"):
        st.set_order("best")


def test_scores_arrive_prompt_by_prompt_and_unscored_pairs_wait_at_the_end(store):
    spec = _session(store.preferences)
    st, heard = AnnotateState(), []
    st.use(store.preferences, spec)
    st.set_scorer(SCORER)
    st.set_order("least_sure")
    jobs = st.to_score()
    assert [j.prompt for j in jobs] == ["p0", "p1", "p2", "p3"]
    assert dict(zip(jobs[2].texts, jobs[2].candidates)) == {"p2 a=-1.0": spec.items[2].a, "p2 b=2.0": spec.items[2].b}
    st.subscribe(heard.append)
    st.add_rewards(SCORER, jobs[2].candidates, fixed_scores("", list(jobs[2].texts)))
    st.add_rewards(SCORER, jobs[0].candidates, fixed_scores("", list(jobs[0].texts)))
    assert st.queue == [0, 2, 1, 3] and "queue" in heard and st.index == 0  # the pair on screen stays
    other = an.Scorer("implicit_dpo", "run-x")
    st.add_rewards(other, [spec.items[1].a, spec.items[1].b], [5.0, -5.0])  # another scorer's: kept, not used
    assert st.queue == [0, 2, 1, 3] and [j.prompt for j in st.to_score()] == ["p1", "p3"]
    with pytest.raises(ValueError, match="2 rewards for 1 answers"):
        st.add_rewards(SCORER, ["x"], [1.0, 2.0])
    # Reopened: the scorer, the order and its rewards are the session's.
    again = AnnotateState()
    again.use(store.preferences, an.SessionSpec.load("order"))
    assert (again.order, again.scorer, again.queue) == ("least_sure", SCORER, [0, 2, 1, 3])
    again.set_scorer(other)
    assert again.rewards == {spec.items[1].a: 5.0, spec.items[1].b: -5.0}


def test_no_prediction_is_shown_before_the_decision(store):
    st, spec = _scored(store.preferences, "least_sure")
    item = st.item
    assert st.item_state().decision == "" and st.revealed_prediction() == ""
    assert st.agreement().decisions == 0
    left_is_better = st.rewards[item.left] > st.rewards[item.right]
    st.press(Key.LEFT)  # saved; the view moves on
    assert st.labeller.state(item).decision == "left"
    assert st.agreement() == Agreement(int(left_is_better), 1)
    assert st.revealed_prediction() == ""  # the next pair: not decided
    st.press(Key.PREVIOUS)  # back to the decided pair: now its prediction may be shown
    assert st.item == item
    expected = "A (left)" if left_is_better else "B (right)"
    assert st.revealed_prediction().startswith(f"The model preferred {expected}")
    st.press(Key.UNDO)  # undecided again: hidden again
    assert st.item == item and st.revealed_prediction() == "" and st.agreement().decisions == 0


def test_agreement_is_over_the_last_twenty_picks_of_a_side(store):
    # 25 pairs where the first answer has the higher reward; the person picks a side on each.
    spec = _session(store.preferences, rewards=[(1.0, 0.0)] * 25, name="many")
    st = AnnotateState()
    st.use(store.preferences, spec)
    st.set_scorer(SCORER)
    st.score_with(fixed_scores)
    prefs = store.preferences
    for n, item in enumerate(spec.items):
        a_on_left = item.left == item.a
        agree = n >= 5  # the first five picks disagree with the model
        pick_left = a_on_left == agree
        st.go(n)
        st.press(Key.LEFT if pick_left else Key.RIGHT)
        if n == 4:
            assert st.agreement() == Agreement(0, 5)
    # make the store's times strictly increasing (decisions within one clock tick keep their row order anyway)
    for n, item in enumerate(spec.items):
        lo, hi = sorted((item.a, item.b))
        prefs.conn.execute(
            "UPDATE comparisons SET updated_at = ? WHERE candidate_a = ? AND candidate_b = ?", (n, lo, hi)
        )
    assert st.agreement() == Agreement(LAST_DECISIONS, LAST_DECISIONS)
    st.go(0)
    st.press(Key.TIE)  # changed to a tie: no longer a pick
    assert st.agreement() == Agreement(20, 20)
    st.go(24)
    st.press(Key.LEFT if spec.items[24].left == spec.items[24].b else Key.RIGHT)  # the newest pick now disagrees
    assert st.agreement() == Agreement(19, 20)
    assert st.agreement().text() == "The model agreed with you on 19 of your last 20 decisions."


def test_agreement_counts_only_this_annotators_picks(store):
    st, spec = _scored(store.preferences, "added")
    st.press(Key.TIE)
    st.press(Key.BOTH_BAD)
    assert st.agreement().decisions == 0  # ties and both bad are not picks
    other = an.Labeller(store.preferences, spec, annotator="someone else")
    other.decide(spec.items[2], "left")
    assert st.agreement().decisions == 0


def test_scorers_from_runs_and_folders(tmp_path):
    dpo = {
        "id": "r1",
        "name": "dpo-1",
        "objective": "dpo",
        "config": json.dumps({"init_adapter": "r0:step-000040", "dpo_beta": 0.2}),
    }
    s = an.scorer_for_run(dpo)
    assert s == an.Scorer("implicit_dpo", "r1", reference="r0:step-000040", beta=0.2, name="dpo-1")
    assert an.split_adapter_ref(s.reference) == ("r0", 40) and an.split_adapter_ref("r0") == ("r0", None)
    assert an.scorer_for_run({"id": "r2", "objective": "reward"}) == an.Scorer("reward_model", "r2")
    assert an.scorer_for_run({"id": "r3", "objective": "sft"}) is None
    rm, adapter, other = tmp_path / "rm", tmp_path / "ad", tmp_path / "other"
    for folder in (rm, adapter, other):
        folder.mkdir()
    (rm / "reward_head.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text("{}")
    assert an.scorer_for_folder(str(rm)).kind == "reward_model"
    assert an.scorer_for_folder(str(adapter)) == an.Scorer("implicit_dpo", str(adapter), name="ad")
    with pytest.raises(ValueError, match="neither a reward model"):
        an.scorer_for_folder(str(other))
    with pytest.raises(ValueError, match="does not exist"):
        an.scorer_for_folder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="choose a scorer"):
        an.Scorer("reward_model", " ")
