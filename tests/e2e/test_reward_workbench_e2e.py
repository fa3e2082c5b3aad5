"""Rewards for GRPO as a person sets them up, through the real window on 1024 x 768: GRPO chosen with a click, a
`json_valid` reward added with the mouse and a `length` reward picked from the list with the keyboard, its bound and
weight typed; *Try the rewards…* opens the workbench, which samples the tiny model's answers to the dataset's prompts
and shows every answer's scores, the weighted totals, the best and worst answer per prompt and each function's
spread, all on the screen."""

from __future__ import annotations

import json

from conftest import inside, off_screen, wait_for

PROMPTS = [
    {"prompt": "Reply with a JSON object naming a colour.", "completion": '{"colour": "red"}'},
    {"prompt": "Reply with a JSON list of two numbers.", "completion": "[1, 2]"},
]
WORKBENCH = ("workbenchPrompts", "workbenchAnswers", "workbenchMaxTokens", "workbenchSample", "workbenchStatus")
WORKBENCH += ("workbenchTable", "workbenchStats", "workbenchClose")


def test_pick_grpo_add_two_rewards_and_see_their_scores(app_factory, tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    config = {"model": str(tiny_model_dir), "dataset": str(data), "max_steps": 2}
    app = app_factory(size=(1024, 768), settings={"last_config": config}).start()
    assert app.state()["current_tab"].endswith("Set up")
    assert "rewardsEditor" not in app.state()["widgets"]

    app.scroll_to("objective_grpo", "settingsScroll")
    app.click("objective_grpo")
    assert app.text("objectiveAbout").startswith("GRPO trains the model online")
    app.scroll_to("rewardsEmpty", "settingsScroll")
    assert app.text("rewardsError") == "GRPO scores its answers with rewards: add at least one reward function."

    # Valid JSON is the list's first kind: one click on Add reward
    app.scroll_to("addRewardButton", "settingsScroll")
    assert app.text("addRewardKind") == "Valid JSON"
    app.click("addRewardButton")
    assert app.text("reward_0_title") == "1. Valid JSON"
    # Length window from the list by the keyboard: open it, five down, Return
    app.scroll_to("addRewardKind", "settingsScroll")
    app.click("addRewardKind")
    app.key("Down", "Down", "Down", "Down", "Down", "Return")
    assert app.text("addRewardKind") == "Length window"
    app.scroll_to("addRewardButton", "settingsScroll")
    app.click("addRewardButton")
    state = app.state()
    assert state["focus"]["name"] == "reward_1_min_tokens", state["focus"]  # the new reward takes the keyboard
    said = app.wait_text("reward_1_error", lambda t: "needs at least one bound" in t, 5, "the length's own message")
    assert said.startswith("Reward 2 (length): "), said
    app.scroll_to("reward_1_max_chars", "settingsScroll")
    app.fill("reward_1_max_chars", "8")  # answers longer than 8 characters score less
    assert app.text("reward_1_max_chars") == "8"
    app.scroll_to("reward_1_weight", "settingsScroll")
    app.fill("reward_1_weight", "0.5")
    widgets = app.state()["widgets"]
    assert "reward_1_error" not in widgets and "reward_0_error" not in widgets and "rewardsError" not in widgets
    wait_for(lambda: app.widget("startButton")["enabled"], 60, "Start to be enabled (rewards and data fine)")
    app.screenshot("01-rewards")

    app.scroll_to("tryRewardsButton", "settingsScroll")
    app.click("tryRewardsButton")
    app.fill("workbenchPrompts", "2")
    app.fill("workbenchAnswers", "3")
    app.fill("workbenchMaxTokens", "10")
    app.click("workbenchSample")
    status = app.wait_text("workbenchStatus", lambda t: t.startswith("Scored"), 240, "the scores")
    assert status == "Scored 6 answers to 2 prompts.", status
    state = app.state()
    assert "workbenchError" not in state["widgets"]
    bench = state["widgets"]["rewardWorkbench"]
    assert inside(bench["rect"], state["screen"]), bench["rect"]
    assert off_screen(state, WORKBENCH) == {}, "the workbench at 1024 x 768: off-screen or clipped"
    rows = state["widgets"]["workbenchTable"]["rows"]
    assert (
        len(rows) == 6 and rows[0]["cells"][0] == PROMPTS[0]["prompt"] and rows[3]["cells"][0] == PROMPTS[1]["prompt"]
    )
    for row in rows:
        prompt, answer, valid, length, total, mark = row["cells"]
        assert valid in ("0", "1") and 0 <= float(length) <= 1, row["cells"]
        assert abs(float(total) - (float(valid) + 0.5 * float(length))) < 0.01, row["cells"]
        assert mark in ("", "best", "worst")
    for group in (rows[:3], rows[3:]):
        totals = [float(r["cells"][4]) for r in group]
        marks = [r["cells"][5] for r in group]
        if max(totals) > min(totals):  # a prompt whose answers differ has its best and worst marked
            assert marks.count("best") == 1 and marks.count("worst") == 1, marks
            assert totals[marks.index("best")] == max(totals) and totals[marks.index("worst")] == min(totals)
        else:
            assert marks == ["", "", ""]
    stats = [r["cells"][0] for r in state["widgets"]["workbenchStats"]["rows"]]
    assert stats == ["json_valid", "length", "total"]
    app.screenshot("02-workbench")
    app.click("workbenchClose")
    assert "rewardWorkbench" not in app.state()["widgets"]
