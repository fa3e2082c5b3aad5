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
