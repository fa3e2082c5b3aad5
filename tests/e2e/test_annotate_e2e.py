"""Labelling as a person does it, through the real window: a session of prompts x 4 answers on the tiny model,
every Annotate key, an edit and a ranking saved with Ctrl+Return (never a training run), Esc, Ctrl+Z, the arrows;
the app killed (-9) right after a key and started again with every decision there; then *Train DPO on these pairs*
lands on a Set up that can start, with DPO's settings, and the run's first loss is ln 2."""

from __future__ import annotations

import math
import time

from conftest import wait_for

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "What is rain?"]


def _decisions(app, annotator: str) -> dict[str, int]:
    return dict(app.query("SELECT decision, count(*) FROM comparisons WHERE annotator = ? GROUP BY 1", annotator))


def _runs(app) -> list[tuple]:
    return app.query("SELECT id, objective, status FROM runs")


def _position(app) -> str:
    return app.text("labelPosition")


def test_every_annotate_key_survives_a_kill_and_trains_dpo(app_factory, tiny_model_dir):
    app = app_factory(settings={"last_config": {"model": str(tiny_model_dir), "max_steps": 2}}).start()
    app.key("ctrl+4")
    assert app.state()["current_tab"].endswith("Annotate")
    app.fill("sessionName", "e2e")
    assert app.text("sessionModel") == str(tiny_model_dir)
    app.fill("pairsPerPrompt", "2")  # 4 answers per prompt, 2 pairs
    app.fill("maxNewTokens", "8")
    app.click("sessionPrompts")
    app.type("\n".join(PROMPTS))
    app.click("generateButton")
    app.wait_text("annotateStatus", lambda t: t.startswith("All answers generated"), 180, "the answers")
    app.screenshot("generated")
    state = app.state()
    assert state["focus"]["name"] == "labelView" and app.text("labelFocusHint") == "Keys work here."
    assert app.text("promptsCount") == "4 prompts in session 'e2e' (read-only)."
    # The name is typed after Generate: the decisions are still this person's (a reopened session shows them).
    app.fill("annotatorName", "me")
    app.key("a")  # a letter typed into the field is the name's ...
    assert app.text("annotatorName") == "mea" and app.query("SELECT id FROM comparisons") == []
    app.key("BackSpace", "Return")  # ... and Return gives the keys back to the labels
    assert app.state()["focus"]["name"] == "labelView"
    assert _position(app) == "Pair 1 of 8"

    app.key("3", "a")  # strength 3, left better
    app.key("b", "t", "x", "s")
    stored = _decisions(app, "me")
    assert (stored.get("tie"), stored.get("both_bad"), stored.get("skip")) == (1, 1, 1), stored
    assert stored.get("a", 0) + stored.get("b", 0) == 2, stored  # left and right picks, in the store's order
    assert app.query("SELECT strength FROM comparisons WHERE annotator = 'me' AND strength IS NOT NULL") == [(1.0,)]
    assert _position(app) == "Pair 6 of 8"

    # E: edit the left answer, Ctrl+Return saves it (blocker 1: it started a training run instead).
    app.key("e")
    assert app.widget("editBox")["focus"]
    app.key("ctrl+a")
    app.type("An edited answer.")
    app.key("ctrl+Return", settle=1.0)
    state = app.state()
    assert state["current_tab"].endswith("Annotate"), f"Ctrl+Return left Annotate for {state['current_tab']}"
    assert _runs(app) == [], "Ctrl+Return in the edit box started a training run"
    edits = app.query("SELECT c.text FROM edits e JOIN candidates c ON c.id = e.edited_id WHERE e.annotator = 'me'")
    assert edits == [("An edited answer.",)]
    assert "editBox" not in state["widgets"] and state["focus"]["name"] == "labelView"
    assert _position(app) == "Pair 7 of 8"

    # Shift+E opens the right answer with visible Save / Cancel buttons; Esc cancels.
    app.key("shift+e")
    state = app.state()
    assert {"editBox", "editSave", "editCancel"} <= set(state["widgets"]), sorted(state["widgets"])
    app.key("Escape")
    assert "editBox" not in app.state()["widgets"] and len(app.query("SELECT id FROM edits")) == 1
    assert app.state()["focus"]["name"] == "labelView"

    # R: rank the prompt's 4 answers, Ctrl+Return writes C(4, 2) = 6 comparisons.
    before = len(app.query("SELECT id FROM comparisons"))
    app.key("r")
    assert app.widget("editBox")["focus"]
    app.type("2 1 4 3")
    app.key("ctrl+Return", settle=1.0)
    assert _runs(app) == [], "Ctrl+Return in the ranking box started a training run"
    assert len(app.query("SELECT id FROM comparisons")) == before + 6
    app.screenshot("ranked")

    # Ctrl+Z takes the ranking back; the arrows move between pairs.
    app.key("ctrl+z")
    assert len(app.query("SELECT id FROM comparisons")) == before and app.text("annotateStatus") == "Undone."
    assert _position(app) == "Pair 7 of 8"
    app.key("Left")
    assert _position(app) == "Pair 6 of 8"
    app.key("Right", "Right")
    assert _position(app) == "Pair 8 of 8"

    # A key, then kill -9 the moment its decision is in the database.
    app.key("a", settle=0)
    wait_for(lambda: sum(_decisions(app, "me").values()) == 7, 5, "the last decision in the database")
    app.kill9()
    stored = _decisions(app, "me")
    assert sum(stored.values()) == 7 and len(app.query("SELECT id FROM edits WHERE annotator = 'me'")) == 1

    app.start()
    app.key("ctrl+4")
    app.wait_text("labelProgress", lambda t: t.startswith("7 done, 1 remaining"), 10, "the reopened session")
    assert app.text("promptsCount") == "4 prompts in session 'e2e' (read-only)."
    assert app.text("annotatorName") == "me"
    assert _position(app) == "Pair 7 of 8"  # the one open pair
    app.screenshot("reopened")

    # Train DPO on these pairs: Set up can start (blocker 2), with DPO's settings.
    app.click("trainDpoButton")
    state = app.state()
    assert state["current_tab"].endswith("Set up")
    summary = app.wait_text("datasetSummary", lambda t: "pairs" in t and "rows" in t, 60, "the pairs' check")
    assert "preference" in summary, summary
    wait_for(lambda: app.widget("startButton")["enabled"], 30, "Start to be enabled")
    assert app.text("field_learning_rate") == "2e-05"
    assert app.text("field_run_name").startswith("dpo-")
    app.screenshot("dpo-setup")
    app.click("startButton")
    wait_for(lambda: [r for r in _runs(app) if r[1] == "dpo"], 30, "the DPO run")
    first = wait_for(
        lambda: app.query("SELECT loss FROM metrics WHERE kind = 'train' ORDER BY step LIMIT 1"), 240, "a first loss"
    )
    assert math.isclose(first[0][0], math.log(2), rel_tol=1e-3), first
    time.sleep(0.5)
    app.screenshot("dpo-training")
