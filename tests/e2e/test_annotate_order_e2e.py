"""Labelling helped by the model, through the real window on a 1024 x 768 screen: a session on the tiny model, an
adapter folder typed as the scorer, "Least sure first" picked from the order box with the keyboard, the answers
scored in the worker; the pair on screen is the one the model is least sure about and nothing says what the model
thinks of it; A (by key) saves the decision, and only then does the agreement line count it."""

from __future__ import annotations

import json

import pytest
from conftest import wait_for

PROMPTS = ["Name a colour.", "Say hello.", "Count to three."]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from tiny_model import build_adapter_dir

    return build_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("scorer") / "dpo-adapter", seed=3)


def test_least_sure_first_then_the_agreement_after_the_decision(app_factory, tiny_model_dir, adapter_dir):
    app = app_factory(size=(1024, 768), settings={"last_config": {"model": str(tiny_model_dir)}}).start()
    app.key("ctrl+4")
    app.fill("sessionName", "e2e-order")
    app.fill("pairsPerPrompt", "2")  # 4 answers per prompt: 6 pairs
    app.fill("maxNewTokens", "6")
    app.click("sessionPrompts")
    app.type("\n".join(PROMPTS))
    app.click("generateButton")
    app.wait_text("annotateStatus", lambda t: t.startswith("All answers generated"), 180, "the answers")
    assert app.text("labelPosition") == "Pair 1 of 6" and "labelAgreement" not in app.state()["widgets"]

    # The scorer: the adapter folder, typed; Return takes it (its scoring starts).
    app.fill("queueScorer", str(adapter_dir))
    app.key("Return")
    assert app.text("queueScorer") == str(adapter_dir)
    # The order: the box opens on a click; Down, Down, Return picks the third choice, "Least sure first".
    assert app.text("queueOrder") == "As added"
    app.click("queueOrder")
    app.key("Down", "Down", "Return")
    assert app.text("queueOrder") == "Least sure first"
    # Scoring began with the scorer; once done, the queue is ordered by it (whichever of the two came first).
    done = ("Every pair has its prediction: the queue is least sure first", "The queue is least sure first")
    app.wait_text("annotateStatus", lambda t: t.startswith(done), 120, "the scores")
    state = app.state()
    assert state["focus"]["name"] == "labelView", state["focus"]

    # The pair on screen is the one with the smallest predicted gap; nothing on screen tells the model's guess.
    scores = json.loads((app.home / "annotation" / "scores" / "e2e-order.json").read_text())
    assert scores["order"] == "least_sure" and scores["scorer"]["kind"] == "implicit_dpo"
    (rewards,) = scores["rewards"].values()
    session = json.loads((app.home / "annotation" / "e2e-order.json").read_text())
    gaps = {(i["a"], i["b"]): rewards[i["a"]] - rewards[i["b"]] for i in session["items"]}
    assert len(gaps) == 6 and len(rewards) == 12
    shown_left = " ".join(app.text("leftAnswer").split())
    first = min(gaps, key=lambda k: abs(gaps[k]))
    texts = {cid: " ".join(text.split()) for cid, text in app.query("SELECT id, text FROM candidates")}
    assert shown_left in (texts[first[0]], texts[first[1]]), (shown_left, texts[first[0]], texts[first[1]])
    left_id, right_id = (first[0], first[1]) if shown_left == texts[first[0]] else (first[1], first[0])
    model_prefers_left = rewards[left_id] > rewards[right_id]
    before = {name: w["text"] for name, w in state["widgets"].items() if w["text"]}
    assert not [n for n, t in before.items() if "The model preferred" in t or "(predicted gap" in t], before
    assert app.text("labelDecision") == "Decision: Not decided yet"
    assert app.text("labelAgreement").startswith("The model's agreement with you shows here after your first pick")
    app.screenshot("least-sure-before")

    # A: left is better. The decision is in the database, then the agreement line counts it.
    app.key("a")
    wait_for(lambda: app.query("SELECT decision FROM comparisons"), 10, "the decision in the database")
    verdict = "agreed" if model_prefers_left else "did not agree"
    app.wait_text("labelAgreement", lambda t: t.startswith(f"The model {verdict} with you on your last decision."), 10)
    assert app.text("labelPosition") == "Pair 2 of 6" and "The model preferred" not in app.text("labelDecision")
    app.key("k")  # back to the decided pair: its prediction is shown now
    side = "A (left)" if model_prefers_left else "B (right)"
    app.wait_text("labelDecision", lambda t: f"The model preferred {side}" in t, 10, "the revealed prediction")
    app.screenshot("least-sure-after")
