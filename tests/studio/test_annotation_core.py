"""Labelling sessions without Qt: prompts from text and files, decisions and undo in the store, Cohen's kappa."""

from __future__ import annotations

import json

import pytest

from finetune_studio.core.store import Store
from finetune_studio.studio.state import annotation as an


def test_cohen_kappa_against_the_formula():
    # 10 items: 7 agreements; annotator 1 says a 6 times, annotator 2 says a 5 times.
    pairs = [("a", "a")] * 4 + [("b", "b")] * 3 + [("a", "b")] * 2 + [("b", "a")]
    p_o, p_e = 0.7, 0.6 * 0.5 + 0.4 * 0.5
    assert an.cohen_kappa(pairs) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert an.cohen_kappa([("tie", "tie")] * 3) == 1.0
    assert an.cohen_kappa([]) is None


def test_prompts_from_text_and_files(tmp_path):
    text = (
        'Plain prompt\n{"prompt": "From a field"}\n{"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "secret answer"}]}\n\n'
    )
    assert an.prompts_from_text(text) == ["Plain prompt", "From a field", "Hi"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Do X", "output": "done"}, {"instruction": "Do X"}]))
    assert an.prompts_from_file(path) == ["Do X"]
    (tmp_path / "empty.jsonl").write_text('{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match="holds no prompts"):
        an.prompts_from_file(tmp_path / "empty.jsonl")


def test_session_rules():
    with pytest.raises(ValueError, match="same model, adapter and seed"):
        an.SessionSpec("s", ["p"], an.Side(seed=1), an.Side(seed=1))
    with pytest.raises(ValueError, match="no prompts"):
        an.SessionSpec("s", ["  "], an.Side(seed=1), an.Side(seed=2))
    assert an.Side(adapter="run1", checkpoint=50).init_adapter == "run1:step-000050"


def test_decisions_undo_and_agreement_in_the_store():
    store = Store()
    prefs = store.preferences
    spec = an.SessionSpec("s", ["p0", "p1"], an.Side(seed=1), an.Side(seed=2), annotator="ann")
    for i, p in enumerate(spec.prompts):
        pid = prefs.add_prompt(p)
        spec.items.append(an.Item(pid, prefs.add_candidate(pid, f"a{i}"), prefs.add_candidate(pid, f"b{i}")))
    me = an.Labeller(prefs, spec)
    me.decide(spec.items[0], "left", an.STRENGTHS[2])
    me.decide(spec.items[0], "tie")  # changed: audited, and undo brings the first decision back
    assert me.state(spec.items[0]).decision == "tie"
    me.undo()
    assert me.state(spec.items[0]) == an.ItemState("left", 2 / 3, me.state(spec.items[0]).comparison_id)
    me.decide(spec.items[1], "both_bad")
    other_spec = an.SessionSpec("s", spec.prompts, spec.side_a, spec.side_b, annotator="other", items=spec.items)
    other = an.Labeller(prefs, other_spec)
    other.decide(spec.items[0], "left")
    other.decide(spec.items[1], "tie")
    kappa, n = an.agreement(me, spec.items)["other"]
    assert n == 2 and kappa == pytest.approx(an.cohen_kappa([("x", "x"), ("both_bad", "tie")]))
    me.undo()
    me.undo()
    assert me.state(spec.items[0]).decision == me.state(spec.items[1]).decision == ""
    assert prefs.stats()["comparisons"] == 2  # the other annotator's
    store.close()


def _session(prefs, prompts=("p0", "p1"), per_prompt=1, annotator=""):
    spec = an.SessionSpec("s", list(prompts), an.Side(seed=1), an.Side(seed=2), pairs_per_prompt=per_prompt)
    spec.annotator = annotator
    for i, p in enumerate(spec.prompts):
        pid = prefs.add_prompt(p, source=spec.source)
        cands = [prefs.add_candidate(pid, f"answer {i}.{k}") for k in range(2 * per_prompt)]
        spec.items += [an.Item(pid, cands[2 * k], cands[2 * k + 1]) for k in range(per_prompt)]
    spec.save()
    return spec


def test_annotate_state_keys_without_qt():
    from finetune_studio.studio.state.annotate import AnnotateState, Key

    store = Store()
    prefs = store.preferences
    spec = _session(prefs, ("p0", "p1", "p2"))
    st, heard = AnnotateState(), []
    st.subscribe(heard.append)
    st.use(prefs, spec)
    assert (st.index, st.item) == (0, spec.items[0]) and "session" in heard
    st.press(Key.STRENGTH_2)
    assert st.strength == 2
    st.press(Key.LEFT)
    state = st.labeller.state(spec.items[0])
    assert (state.decision, state.strength, st.strength, st.index) == ("left", 2 / 3, None, 1)
    st.press(Key.EDIT_RIGHT)
    assert st.editing == "right"
    st.press(Key.TIE)  # the box has the keys: nothing decided
    assert st.item_state().decision == ""
    right = prefs.candidate(spec.items[1].right)["text"]
    assert not st.save(right) and "identical" in st.message and st.editing == "right"
    st.cancel()
    assert st.editing == "" and st.item_state().decision == ""
    st.press(Key.EDIT_LEFT)
    assert st.save("A better answer.") and st.index == 2 and prefs.stats()["edits"] == 1
    st.press(Key.RANK)  # two answers to the prompt: no ranking
    assert st.editing == "" and "3 or more" in st.message
    st.press(Key.SKIP)
    assert st.all_labelled and st.message == "All 3 pairs labelled." and st.index == 2
    st.press(Key.UNDO)
    assert st.message == "Undone." and st.index == 2 and not st.all_labelled
    st.press(Key.PREVIOUS)
    st.press(Key.PREVIOUS)
    st.press(Key.PREVIOUS)
    assert st.index == 0
    st.press(Key.NEXT)
    assert st.index == 1
    store.close()


def test_annotate_state_ranks_and_the_annotator_is_the_one_typed_last():
    from finetune_studio.studio.state.annotate import RANK_PROMPT, AnnotateState, Key

    store = Store()
    prefs = store.preferences
    spec = _session(prefs, ("p0",), per_prompt=2)  # four answers to one prompt
    st = AnnotateState()
    st.use(prefs, spec)
    st.press(Key.RANK)
    assert st.editing == "rank" and st.rank_text().endswith(RANK_PROMPT) and st.rank_text().startswith("1: ")
    assert not st.save(st.rank_text() + "1 2") and "from 1 to 4 once" in st.message
    assert st.save(st.rank_text() + "4 3 2 1") and prefs.stats()["comparisons"] == 6 and st.all_labelled
    # The name typed after the session was made: the decisions made before it stay with no name ...
    st.set_annotator("me")
    assert st.labeller.annotator == "me" and not st.all_labelled and st.message == "Labelling as me."
    st.press(Key.BOTH_BAD)
    # ... and the session reopens under "me", with "me"'s decision done.
    again = AnnotateState()
    again.use(prefs, an.SessionSpec.load("s"))
    assert again.labeller.annotator == "me" and again.progress().done == 1
    store.close()


def test_prompts_keep_their_newlines_and_plurals_read_right(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Line one\nline two"}]}, {"prompt": "Single"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert an.prompts_from_file(path) == ["Line one\nline two", "Single"]
    spec = an.SessionSpec("multi", an.prompts_from_file(path), an.Side(seed=1), an.Side(seed=2))
    spec.save()
    assert an.SessionSpec.load("multi").prompts == ["Line one\nline two", "Single"]
    assert (an.plural(1, "tie"), an.plural(2, "tie"), an.plural(0, "both bad", "both bad")) == (
        "1 tie",
        "2 ties",
        "0 both bad",
    )
    assert an.policy_text({"tie": 1, "skip": 2}).startswith("Left out of DPO data (no preferred side): 1 tie, 0 both")
