"""The ``json_fields`` reward: the share of a reference object's fields an answer has right, typed strictly; its
exact form agrees with the demo task's scorer on every case that scorer is tested on."""

from __future__ import annotations

import json

import pytest

from finetune_studio.core.config import ConfigError
from finetune_studio.core.rewards import RewardError, RewardSet, parse_rewards
from finetune_studio.core.rewards.json_fields import fields_score, same_value
from finetune_studio.engine.demo import task as demo

EXPECTED = {"name": "Ana Silva", "age": 31, "city": "Porto", "job": None}
DEMO = [
    {"kind": "json_fields", "column": "expected", "name": "fields"},
    {"kind": "json_fields", "column": "expected", "partial": False, "name": "exact"},
]
ANSWERS = {
    '{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}': 1.0,
    '  {"name":"Ana Silva","age":31,"city":"Porto","job":null}\n': 1.0,
    '{\n  "job": null,\n  "city": "Porto",\n  "age": 31,\n  "name": "Ana Silva"\n}': 1.0,
    '{"name": "Ana Silva", "age": 32, "city": "Porto", "job": null}': 0.75,
    '{"name": "Ana", "age": 31, "city": "Porto", "job": null}': 0.75,
    '{"name": "Ana Silva", "age": 31, "city": "Porto", "job": "nurse"}': 0.75,
    '{"name": "Ana Silva", "age": "31", "city": "Porto", "job": null}': 0.75,  # a string is not a number
    '{"name": "Ana Silva", "age": 31.0, "city": "Porto", "job": null}': 0.75,  # nor a decimal an integer
    '{"name": "Ana Silva", "age": true, "city": "Porto", "job": null}': 0.75,
    '{"name": "Ana Silva", "age": 31, "city": "Porto", "job": 7}': 0.75,
    '{"name": ["Ana Silva"], "age": 31, "city": "Porto", "job": null}': 0.75,
    '{"name": "Ana", "age": 30, "city": "Lisbon", "job": "nurse"}': 0.0,
    '{"name": "Ana Silva", "age": 31, "city": "Porto"}': 0.0,  # a key missing
    '{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null, "country": "PT"}': 0.0,  # one too many
    '```json\n{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}\n```': 0.0,
    'JSON: {"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}': 0.0,
    '[{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}]': 0.0,
    "Ana Silva is 31 and lives in Porto.": 0.0,
    '{"name": "Ana Silva", "age": 31, "city": "Porto", "job": nu': 0.0,
    '{"name": "Ana Silva", "age": NaN, "city": "Porto", "job": null}': 0.0,  # NaN is not JSON
    "": 0.0,
}


@pytest.mark.parametrize("answer, share", list(ANSWERS.items()))
def test_the_share_of_fields_right_and_the_exact_form_agrees_with_the_demo_scorer(answer, share):
    assert fields_score(answer, EXPECTED) == share
    exact = fields_score(answer, EXPECTED, partial=False)
    assert exact == (1.0 if share == 1.0 else 0.0)
    assert (exact == 1.0) == demo.score_answer(answer, EXPECTED)[1]


def test_same_value_tells_json_types_apart_at_every_depth():
    assert same_value({"a": [1, "x", None]}, {"a": [1, "x", None]})
    assert not same_value({"a": [1]}, {"a": [1.0]})
    assert not same_value({"a": [True]}, {"a": [1]})
    assert not same_value({"a": 1}, {"a": 1, "b": 2})
    assert not same_value([1, 2], [2, 1])


def test_fields_and_exact_keys_choose_what_is_compared():
    answer = '{"name": "Ana Silva", "age": 40, "city": "Porto", "job": null, "note": "x"}'
    assert fields_score(answer, EXPECTED) == 0.0  # an extra key
    assert fields_score(answer, EXPECTED, exact_keys=False) == 0.75
    assert fields_score(answer, EXPECTED, exact_keys=False, fields=["name", "city"]) == 1.0
    assert fields_score(answer, EXPECTED, exact_keys=False, fields=["name", "age"]) == 0.5
    assert fields_score('{"name": "Ana Silva"}', EXPECTED, exact_keys=False) == 0.25  # missing keys count as wrong


def test_the_demo_rewards_through_the_reward_set():
    answers = list(ANSWERS)
    refs = [EXPECTED if i % 2 else json.dumps(EXPECTED) for i in range(len(answers))]  # a mapping or its JSON
    with RewardSet(DEMO) as rewards:
        scores = rewards.score(["p"] * len(answers), answers, {"expected": refs})
    assert scores.by_function["fields"] == list(ANSWERS.values())
    assert scores.by_function["exact"] == [1.0 if s == 1.0 else 0.0 for s in ANSWERS.values()]
    assert scores.total == [f + e for f, e in zip(scores.by_function["fields"], scores.by_function["exact"])]
    chat = [[{"role": "assistant", "content": answers[0]}]]  # TRL's conversational completions
    with RewardSet(DEMO) as rewards:
        assert rewards.score(["p"], chat, {"expected": [EXPECTED]}).total == [2.0]


def test_bad_settings_and_bad_references_say_what_to_change():
    with pytest.raises(ConfigError, match="json_fields needs 'column'"):
        parse_rewards([{"kind": "json_fields"}])
    with pytest.raises(ConfigError, match="partial must be true or false"):
        parse_rewards([{"kind": "json_fields", "column": "expected", "partial": "yes"}])
    with pytest.raises(ConfigError, match="reads the column 'expected', which the dataset does not have"):
        parse_rewards([{"kind": "json_fields", "column": "expected"}], columns=["prompt", "answer"])
    with RewardSet(DEMO[:1]) as rewards:
        with pytest.raises(RewardError, match="row 0: the reference 'not json' in column 'expected' is not a JSON"):
            rewards.score(["p"], ["{}"], {"expected": ["not json"]})
        with pytest.raises(RewardError, match="is int; give a JSON object"):
            rewards.score(["p"], ["{}"], {"expected": [3]})
