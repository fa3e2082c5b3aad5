"""The rewards editor's model and the reward workbench's figures, Qt-free: form rows <-> TrainConfig.rewards, each
reward's own message from core.rewards, GRPO's need for a reward, and the workbench's totals, spread, best and worst
answers and prompts read from the dataset."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from finetune_studio.core.rewards import RewardSet
from finetune_studio.core.rewards.spec import SETTINGS
from finetune_studio.studio.state import rewards as rw
from finetune_studio.studio.state.reward_workbench import (
    PromptReadError,
    PromptRow,
    WorkbenchResult,
    columns_per_answer,
    in_words,
    read_prompts,
    starting_adapter,
)
from finetune_studio.studio.state.setup import SetupState


def test_every_kind_core_knows_has_an_editor_with_exactly_its_settings():
    assert set(rw.KINDS) == set(SETTINGS)
    for kind, info in rw.KINDS.items():
        assert {p.name for p in info.params} == set(SETTINGS[kind]), kind
        assert info.sentence.endswith(".") and info.label


def test_rows_as_the_form_holds_them_become_typed_rewards_and_back():
    length = {**rw.new_row("length"), "weight": "0.5", "max_tokens": "40", "name": "short"}
    schema = {**rw.new_row("json_schema"), "schema": '{"type": "object", "required": ["name"]}'}
    contains = {**rw.new_row("contains"), "text": '["yes", "no"]', "ignore_case": True}
    specs = rw.typed_specs([rw.new_row("json_valid"), length, schema, contains])
    assert specs[1] == {"kind": "length", "name": "short", "weight": 0.5, "max_tokens": 40, "soft": True}
    assert specs[2]["schema"] == {"type": "object", "required": ["name"]} and specs[2]["weight"] == 1.0
    assert specs[3]["text"] == ["yes", "no"] and specs[3]["ignore_case"] is True
    assert "min_tokens" not in specs[1]  # an empty optional field is left out
    # what a preset or an earlier run's config holds comes back as the same rows
    again = rw.form_rows(specs)
    assert again[1] == length and json.loads(again[2]["schema"]) == json.loads(schema["schema"])
    assert rw.typed_specs(again) == specs


def test_a_new_reference_reward_reads_the_column_a_grpo_run_gives_it():
    for kind in ("exact_match", "token_f1", "json_fields"):
        assert rw.new_row(kind)["column"] == "answer"
        assert rw.typed_spec(0, rw.new_row(kind))["column"] == "answer"


def test_a_value_that_cannot_be_read_names_the_reward_and_the_field():
    rows = [rw.new_row("json_valid"), {**rw.new_row("length"), "max_tokens": "forty"}]
    with pytest.raises(rw.ConfigError) as caught:
        rw.typed_specs(rows)
    assert "Reward 2 (length): max tokens must be a whole number, not 'forty'" in str(caught.value)
    with pytest.raises(rw.ConfigError, match="the weight must be a number, not 'x'"):
        rw.typed_spec(0, {**rw.new_row("json_valid"), "weight": "x"})


def test_each_reward_gets_its_own_message_from_core_rewards_numbered_by_its_place():
    rows = [
        rw.new_row("json_valid"),
        {**rw.new_row("regex"), "pattern": "("},
        {**rw.new_row("exact_match"), "column": ""},  # no column
        {**rw.new_row("length"), "max_tokens": "10", "min_chars": "3"},
    ]
    check = rw.check_rows(rows, needed=True)
    assert set(check.rows) == {1, 2, 3} and not check.ok
    assert check.rows[1].startswith("Reward 2 (regex): ") and "not a valid regular expression" in check.rows[1]
    assert check.rows[2].startswith("Reward 3 (exact_match): ") and "'column'" in check.rows[2]
    assert check.rows[3].startswith("Reward 4 (length): ") and "not both" in check.rows[3]
    assert check.summary().endswith("(and 2 more problems below)")
    # two rewards given the same name: the list as a whole is wrong
    named = [{**rw.new_row("json_valid"), "name": "fmt"}, {**rw.new_row("think_answer"), "name": "fmt"}]
    whole = rw.check_rows(named, needed=True)
    assert whole.rows == {} and "used twice" in whole.whole


def test_grpo_needs_a_reward_before_it_can_start_and_other_objectives_ignore_them():
    st = SetupState({"dataset": "d.jsonl", "objective": "grpo"})
    assert not st.ready and "add at least one reward" in st.errors["rewards"]
    st.set("rewards", [rw.new_row("json_valid"), {**rw.new_row("length"), "max_tokens": "40", "weight": "0.5"}])
    assert st.ready, st.errors
    assert st.config.rewards == [
        {"kind": "json_valid", "weight": 1.0, "after_think": False},
        {"kind": "length", "weight": 0.5, "max_tokens": 40, "soft": True},
    ]
    st.set("rewards", [*st.values["rewards"], {**rw.new_row("python"), "path": "/no/such/reward.py"}])
    assert not st.ready and st.reward_check.rows[2].startswith("Reward 3 (python): the reward file")
    assert st.errors["rewards"] == st.reward_check.rows[2]
    # SFT does not score answers: the rewards wait in the form (and in what is remembered), the run has none
    st.set("objective", "sft")
    assert st.ready and st.config.rewards == [] and len(st.config_dict()["rewards"]) == 3
    # a past GRPO run's config fills the editor's rows again
    st.load({"objective": "grpo", "rewards": [{"kind": "regex", "pattern": "^{", "weight": 2}]})
    assert st.values["rewards"][0]["pattern"] == "^{" and st.values["rewards"][0]["weight"] == "2"
    assert st.ready and st.config.rewards[0]["weight"] == 2.0


def _result() -> WorkbenchResult:
    prompts = [PromptRow("p0", (), {"answer": "a"}), PromptRow("p1", (), {"answer": "b"})]
    answers = [["x", "y", "z"], ["u", "v", "w"]]
    scores = {"fmt": [1.0, 0.0, 1.0, 1.0, 1.0, 1.0], "len": [0.2, 0.9, 0.6, 0.5, 0.5, 0.5]}
    return WorkbenchResult(prompts, answers, ["fmt", "len", "rm"], [1.0, 2.0, 1.0], scores, {"rm": "later"})


def test_workbench_totals_stats_best_and_worst():
    result = _result()
    totals = result.totals()
    expected = [f + 2 * s for f, s in zip(result.scores["fmt"], result.scores["len"], strict=True)]
    assert totals == pytest.approx(expected)  # the unscored reward model is left out of the total
    stats = {s.name: s for s in result.stats()}
    assert list(stats) == ["fmt", "len", "total"]
    values = result.scores["len"]
    assert stats["len"].mean == pytest.approx(statistics.fmean(values))
    assert stats["len"].std == pytest.approx(statistics.pstdev(values))
    assert (stats["len"].min, stats["len"].max, stats["len"].weight) == (0.2, 0.9, 2.0)
    # prompt 1's answers all score the same under each function: no signal there for GRPO
    assert stats["fmt"].flat_prompts == 1 and stats["len"].flat_prompts == 1 and stats["total"].flat_prompts == 1
    # best and worst per prompt by the total; a prompt whose totals are all equal has neither
    assert result.best_and_worst() == {0: (2, 0)}
    assert result.rows()[4] == (4, 1, 1)


def test_workbench_total_is_the_reward_sets_weighted_sum():
    specs = [{"kind": "json_valid"}, {"kind": "length", "max_chars": 10, "weight": 0.5}]
    answers = [['{"a": 1}', "not json at all, and long", "{}"]]
    prompts = [PromptRow("Give JSON.")]
    with RewardSet(specs) as rewards:
        scored = rewards.score(["Give JSON."] * 3, answers[0], columns_per_answer(prompts, answers))
    result = WorkbenchResult(prompts, answers, rewards.names, [1.0, 0.5], scored.by_function)
    assert result.totals() == pytest.approx(scored.total)
    best, worst = result.best_and_worst()[0]
    assert worst == 1 and best in (0, 2)


def test_scores_must_match_the_answers():
    with pytest.raises(ValueError, match="2 scores for 3 answers"):
        WorkbenchResult([PromptRow("p")], [["a", "b", "c"]], ["f"], [1.0], {"f": [1.0, 0.0]})
    with pytest.raises(ValueError, match="finite"):
        WorkbenchResult([PromptRow("p")], [["a"]], ["f"], [1.0], {"f": [math.nan]})


def test_prompts_and_their_reference_answers_from_the_dataset(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Name a colour.", "completion": "red", "id": 3},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Bye."},
            ]
        },
        {"nothing": "here"},
        {"question": "2+2?"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    got = read_prompts(str(jsonl), 5)
    assert [p.text for p in got] == ["Name a colour.", "And?", "2+2?"]
    # the rewards get what a GRPO run gives them: the reference answer as 'answer' (no other columns)
    assert got[0] == PromptRow("Name a colour.", (), {"answer": "red"})
    # a conversation: the turns before its last answer are the prompt, that answer the reference
    assert got[1].messages == (("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "And?"))
    assert got[1].columns == {"answer": "Bye."} and got[2].columns == {}
    assert read_prompts(str(jsonl), 1) == got[:1]
    # a mapping names the prompt and answer columns
    mapped = read_prompts(str(jsonl), 5, {"prompt": "completion", "completion": "prompt"})
    assert mapped == [PromptRow("red", (), {"answer": "Name a colour."})]
    table = tmp_path / "p.csv"
    with open(table, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerows([["instruction", "output"], ["Add 1 and 2.", "3"]])
    assert read_prompts(str(table), 3) == [PromptRow("Add 1 and 2.", (), {"answer": "3"})]
    assert columns_per_answer(got, [["a", "b"], ["c"], ["d"]]) == {"answer": ["red", "red", "Bye.", None]}


@pytest.mark.parametrize(
    ("dataset", "says"),
    [
        ("", "Choose a dataset first"),
        ("pairs:latest", "holds pairs, not prompts"),
        ("data.parquet", "reads prompts from .jsonl"),
    ],
)
def test_prompts_that_cannot_be_read_are_said_in_words(dataset, says):
    with pytest.raises(PromptReadError, match=says):
        read_prompts(dataset, 3)


def test_a_file_without_prompts_says_what_it_looks_for(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "just text"}\n', encoding="utf-8")
    with pytest.raises(PromptReadError, match="looks for a prompt column or a conversation"):
        read_prompts(str(path), 3)


def test_starting_adapter_as_the_worker_attaches_it(tmp_path):
    assert starting_adapter("") == ("", None, False)
    assert starting_adapter("abc123") == ("abc123", None, False)
    assert starting_adapter("abc123:step-000050") == ("abc123", 50, False)
    assert starting_adapter("abc123:7") == ("abc123", 7, False)
    assert starting_adapter("abc123:best") == ("abc123", None, True)
    assert starting_adapter(str(tmp_path)) == (str(tmp_path), None, False)


def test_a_reward_functions_traceback_becomes_the_line_it_failed_on():
    raw = (
        "reward 'python': python reward reward() in /tmp/x/my_reward.py raised ValueError: no city; fix the function\n"
        "Traceback (most recent call last):\n"
        '  File "/tmp/x/my_reward.py", line 3, in reward\n'
        '    raise ValueError("no city")\n'
        "ValueError: no city"
    )
    said = in_words(raw)
    assert said == (
        "Reward 'python': python reward reward() in /tmp/x/my_reward.py raised ValueError: no city; fix the function "
        "(my_reward.py, line 3, in reward)"
    )
    assert in_words("reward 'len': returned 2 score(s) for 3 completion(s)") == (
        "Reward 'len': returned 2 score(s) for 3 completion(s)"
    )


def test_each_objective_says_what_it_trains_and_a_reward_model_needs_pairs():
    from finetune_studio.core.protocol.dataset_report import DatasetReport
    from finetune_studio.studio.state.setup import OBJECTIVE_SENTENCES

    assert {"sft", "dpo", "reward", "grpo"} <= set(OBJECTIVE_SENTENCES)
    st = SetupState({"dataset": "d.jsonl", "objective": "reward"})
    st.set_dataset_info(DatasetReport(file="d.jsonl", format="messages", kind="sft", rows=3))
    assert st.errors["objective"].startswith("A reward model needs preference data")
    st.set_dataset_info(DatasetReport(file="d.jsonl", format="pairs", kind="preference", rows=3))
    assert "objective" not in st.errors and st.ready
