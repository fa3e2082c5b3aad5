"""Nothing of Annotate off-screen on 1024 x 768 and 1440 x 900: the window fits the screen on first start, and the
answers, the keys' help, the edit / ranking box's Save and Cancel and *Train DPO on these pairs* are all on it, also
while R's ranking box is open (it used to widen the window past the screen)."""

from __future__ import annotations

import pytest

MUST_SEE = ("leftAnswer", "rightAnswer", "labelKeys", "labelDecision", "trainDpoButton", "labelProgress")


def _inside(rect: list[int], screen: list[int]) -> bool:
    x, y, w, h = rect
    sx, sy, sw, sh = screen
    return x >= sx and y >= sy and x + w <= sx + sw and y + h <= sy + sh


def _off_screen(state: dict, names) -> dict[str, list[int]]:
    out = {}
    for name in names:
        w = state["widgets"].get(name)
        if w is None:
            out[name] = []  # not shown at all
        elif w["visible"] != w["rect"] or not _inside(w["rect"], state["screen"]):
            out[name] = w["rect"]
    return out


@pytest.mark.parametrize("size", [(1024, 768), (1440, 900)], ids=["1024x768", "1440x900"])
def test_annotate_fits_the_screen(app_factory, tiny_model_dir, size):
    app = app_factory(size=size, settings={"last_config": {"model": str(tiny_model_dir)}}).start()
    state = app.state()
    assert _inside(state["window"]["rect"], state["screen"]), (state["window"], state["screen"])
    app.key("ctrl+4")
    app.fill("pairsPerPrompt", "2")
    app.fill("maxNewTokens", "4")
    app.click("sessionPrompts")
    app.type("Name a colour.\nSay hello.")
    app.click("generateButton")
    app.wait_text("annotateStatus", lambda t: t.startswith("All answers generated"), 180, "the answers")
    state = app.state()
    assert state["widgets"]["annotatePage"]["rect"][2] <= size[0]
    assert _inside(state["window"]["rect"], state["screen"]), state["window"]
    assert _off_screen(state, MUST_SEE) == {}
    app.screenshot(f"annotate-{size[0]}")
    app.key("r")  # four answers: the ranking box, with its long hint
    state = app.state()
    assert _inside(state["window"]["rect"], state["screen"]), f"R widened the window: {state['window']}"
    assert _off_screen(state, MUST_SEE + ("editBox", "editSave", "editCancel")) == {}
    app.screenshot(f"ranking-{size[0]}")
    app.key("Escape")
    app.key("e")
    assert _off_screen(app.state(), ("editBox", "editSave", "editCancel")) == {}
