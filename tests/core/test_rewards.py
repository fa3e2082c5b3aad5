"""The rewards spec, the built-in verifiers (TRL's reward contract) and their weighted total."""

import json
import math

import pytest

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.rewards import RewardError, RewardSet, parse_rewards


def score(spec: dict, completions: list, **columns) -> list[float]:
    """One reward's scores through a RewardSet, as the engine calls it."""
    rewards = RewardSet([spec])
    out = rewards.score(["a prompt"] * len(completions), completions, columns)
    return out.by_function[rewards.names[0]]


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# --- the verifiers -------------------------------------------------------------------------------------------------
def test_json_valid_takes_one_strict_json_value():
    got = score(
        {"kind": "json_valid"},
        ['{"a": 1}', "  [1, 2]\n", "42", '{"a": 1', "NaN", '{"a": NaN}', "", "sure: {}", '{"a": 1} {"b": 2}'],
    )
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_completions_may_be_chat_messages():
    plain = score({"kind": "json_valid"}, ['{"a": 1}', "nope"])
    as_chat = score({"kind": "json_valid"}, [chat('{"a": 1}'), chat("nope")])
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": '{"a": '}, {"type": "text", "text": "1}"}]}]]
    assert plain == as_chat == [1.0, 0.0]
    assert score({"kind": "json_valid"}, parts) == [1.0]
    with pytest.raises(RewardError, match="completion 0"):
        score({"kind": "json_valid"}, [42])


def test_json_schema_accepts_only_matching_objects(tmp_path):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answers = ['{"name": "Ada", "age": 36}', '{"name": "Ada"}', '{"name": "Ada", "age": "36"}', "not json", "[]"]
    assert score({"kind": "json_schema", "schema": schema}, answers) == [1.0, 0.0, 0.0, 0.0, 0.0]
    file = tmp_path / "person.json"
    file.write_text(json.dumps(schema))
    assert score({"kind": "json_schema", "schema": str(file)}, answers) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_exact_match_plain_normalized_json_and_several_references():
    answers = ["Paris", " Paris\n", "paris", "PARIS  city", "London"]
    refs = ["Paris", "Paris", "Paris", "paris city", "Paris"]
    assert score({"kind": "exact_match", "column": "answer"}, answers, answer=refs) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert score({"kind": "exact_match", "column": "answer", "normalize": True}, answers, answer=refs) == [
        1.0,
        1.0,
        1.0,
        1.0,
        0.0,
    ]
    many = score({"kind": "exact_match", "column": "answer"}, ["Rome", "Oslo"], answer=[["Paris", "Rome"], ["Paris"]])
    assert many == [1.0, 0.0]
    assert score({"kind": "exact_match", "column": "n"}, ["42", "42.0"], n=[42, 42]) == [1.0, 0.0]
    as_json = {"kind": "exact_match", "column": "ref", "json": True}
    answers = ['{"b": 2, "a": 1}', '{"a": 1, "b": 2.0}', '{"a": true, "b": 2}', '{"a": 1}', "{a: 1}"]
    refs = ['{"a": 1, "b": 2}', {"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1}]
    assert score(as_json, answers, ref=refs) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_match_names_a_missing_column_or_reference():
    with pytest.raises(RewardError, match="'answer'.*columns: other"):
        score({"kind": "exact_match", "column": "answer"}, ["x"], other=["y"])
    with pytest.raises(RewardError, match="row 1 has no reference"):
        score({"kind": "exact_match", "column": "answer"}, ["x", "y"], answer=["x", None])
    with pytest.raises(RewardError, match="1 value.*2 completion"):
        score({"kind": "exact_match", "column": "answer"}, ["x", "y"], answer=["x"])


def test_token_f1_is_squads_f1():
    spec = {"kind": "token_f1", "column": "ref"}
    got = score(
        spec,
        ["the cat sat", "The cat", "dog", "", "", "cat cat"],
        ref=["the cat sat", "the cat sat", "cat", "", "x", "cat"],
    )
    # "The cat" vs "the cat sat": precision 2/2, recall 2/3 -> F1 0.8; "cat cat" vs "cat": precision 1/2, recall 1
    assert got == pytest.approx([1.0, 0.8, 0.0, 1.0, 0.0, 2 / 3])
    assert score(spec, ["a b"], ref=[["x", "a b c d"]]) == pytest.approx([2 * 1 * 0.5 / 1.5])


def test_regex_search_and_full_match():
    assert score({"kind": "regex", "pattern": r"\d{3}"}, ["code 123", "12", "(?) 9999"]) == [1.0, 0.0, 1.0]
    full = {"kind": "regex", "pattern": r"\d{3}", "full": True}
    assert score(full, ["123", " 123\n", "code 123", "1234"]) == [1.0, 1.0, 0.0, 0.0]
    assert score({"kind": "regex", "pattern": "(?i)yes"}, ["YES", "no"]) == [1.0, 0.0]


def test_length_window_in_characters_and_tokens():
    chars = {"kind": "length", "min_chars": 4, "max_chars": 8}
    assert score(chars, ["ab", "abcd", "abcdefgh", "abcdefghijklmnop"]) == [0.5, 1.0, 1.0, 0.5]
    hard = {**chars, "soft": False}
    assert score(hard, ["ab", "abcd", "abcdefghijklmnop"]) == [0.0, 1.0, 0.0]
    words = {"kind": "length", "max_tokens": 2}
    assert score(words, ["one two", "one, two", "one two three four"]) == [1.0, 2 / 3, 0.5]
    counted = RewardSet([{"kind": "length", "min_tokens": 10}], count_tokens=len)  # the engine passes its tokenizer
    assert counted.score(["p"], ["abcde"]).total == [0.5]


def test_contains_and_not_contains_score_the_share_found():
    assert score({"kind": "contains", "text": "Paris"}, ["in Paris", "in paris"]) == [1.0, 0.0]
    both = {"kind": "contains", "text": ["red", "blue"], "ignore_case": True}
    assert score(both, ["RED and blue", "red only", "green"]) == [1.0, 0.5, 0.0]
    banned = {"kind": "not_contains", "text": ["As an AI", "sorry"]}
    assert score(banned, ["Here it is.", "sorry, as an AI", "As an AI model, sorry"]) == [1.0, 0.5, 0.0]


def test_think_answer_format():
    ok = [
        "<think>2+2 is 4</think>4",
        "\n<think>\nreason\n</think>\n\nThe answer is 4.\n",
    ]
    bad = [
        "4",  # no thinking
        "<think></think>4",  # blank thinking
        "<think>reason</think>  ",  # no answer
        "Sure! <think>reason</think>4",  # text before the thinking
        "<think>a<think>b</think>4",  # nested
        "<think>a</think>4</think>",  # stray close
        "<think>a</think>4<think>b</think>5",  # two rounds
        "<think>unclosed 4",
    ]
    assert score({"kind": "think_answer"}, ok + bad) == [1.0] * len(ok) + [0.0] * len(bad)
    tagged = {"kind": "think_answer", "answer_tag": True}
    got = score(
        tagged, ["<think>r</think><answer>4</answer>", "<think>r</think>4", "<think>r</think><answer> </answer>"]
    )
    assert got == [1.0, 0.0, 0.0]
    assert score(tagged, ["<think>r</think>\n<answer>4</answer> extra"]) == [0.0]


def test_after_think_checks_only_the_answer_part():
    spec = {"kind": "json_valid", "after_think": True}
    got = score(
        spec, ['<think>let me see {</think>\n{"a": 1}', '<think>x</think><answer>{"a": 1}</answer>', '{"a": 1}']
    )
    assert got == [1.0, 1.0, 1.0]
    assert score({"kind": "json_valid"}, ['<think>x</think>{"a": 1}']) == [0.0]
    match = {"kind": "exact_match", "column": "ref", "after_think": True}
    assert score(match, ["<think>hmm</think> 4", "<think>4</think>5"], ref=["4", "4"]) == [1.0, 0.0]


# --- the weighted total ----------------------------------------------------------------------------------------------
def test_weights_combine_functions_into_the_total():
    rewards = RewardSet(
        [
            {"kind": "json_valid", "weight": 0.5},
            {"kind": "exact_match", "column": "ref", "json": True, "weight": 2},
            {"kind": "length", "max_chars": 10, "weight": -1, "name": "too long"},
            {"kind": "contains", "text": "x", "weight": 0},
        ]
    )
    assert rewards.names == ["json_valid", "exact_match", "too long", "contains"]
    assert rewards.weights == {"json_valid": 0.5, "exact_match": 2.0, "too long": -1.0, "contains": 0.0}
    out = rewards.score(
        ["p"] * 3, ['{"a":1}', '{"a": 2, "pad": "xxxxx"}', "x"], {"ref": [{"a": 1}, {"a": 1}, {"a": 1}]}
    )
    assert out.by_function == {
        "json_valid": [1.0, 1.0, 0.0],
        "exact_match": [1.0, 0.0, 0.0],
        "too long": [1.0, 10 / 24, 1.0],
        "contains": [0.0, 1.0, 1.0],
    }
    expected = [0.5 + 2 - 1, 0.5 - 10 / 24, -1.0]
    assert out.total == pytest.approx(expected)
    assert out.means()["json_valid"] == pytest.approx(2 / 3)


def test_learned_rewards_come_from_the_callable_given():
    seen = []

    def learned(spec):
        seen.append(spec.params["adapter"])
        return lambda prompts, completions, **cols: [float(len(c)) for c in completions]

    rewards = RewardSet([{"kind": "reward_model", "adapter": "/runs/rm", "weight": 0.5}], learned=learned)
    assert seen == ["/runs/rm"]
    assert rewards.score(["p", "p"], ["ab", "abcd"]).total == [1.0, 2.0]
    with pytest.raises(RewardError, match="reward model is scored by the engine"):
        RewardSet([{"kind": "reward_model", "adapter": "/runs/rm"}])


def test_a_learned_function_returning_bad_scores_is_named():
    bad = RewardSet([{"kind": "reward_model", "adapter": "x", "name": "rm"}], learned=lambda s: lambda **kw: [math.nan])
    with pytest.raises(RewardError, match="reward 'rm': score 0 is nan"):
        bad.score(["p"], ["a"])
    short = RewardSet([{"kind": "reward_model", "adapter": "x"}], learned=lambda s: lambda **kw: [1.0])
    with pytest.raises(RewardError, match="1 score.*2 completion"):
        short.score(["p", "q"], ["a", "b"])


def test_repeated_kinds_get_numbered_names():
    specs = parse_rewards(
        [{"kind": "regex", "pattern": "a"}, {"kind": "regex", "pattern": "b"}, {"kind": "json_valid"}]
    )
    assert [s.name for s in specs] == ["regex", "regex_2", "json_valid"]


# --- parse errors a person can act on ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "specs,message",
    [
        ({"kind": "json_valid"}, "must be a list of rewards"),
        (["json_valid"], "reward 1: must be a mapping"),
        ([{"weight": 1}], "say which kind"),
        ([{"kind": "exact_matc"}], "unknown kind 'exact_matc' \\(did you mean 'exact_match'\\?\\)"),
        ([{"kind": "exact_match"}], "exact_match needs 'column'"),
        ([{"kind": "regex", "pattern": "([a-z]"}], "not a valid regular expression"),
        ([{"kind": "json_schema", "schema": {"type": "objekt"}}], "not a valid JSON Schema at type"),
        ([{"kind": "json_schema", "schema": "/no/such/schema.json"}], "schema file not found"),
        ([{"kind": "json_valid", "weight": "heavy"}], "weight must be a finite number"),
        ([{"kind": "json_valid", "weight": float("nan")}], "weight must be a finite number"),
        ([{"kind": "json_valid", "weight": True}], "weight must be a finite number"),
        ([{"kind": "json_valid", "strict": True}], "unknown setting\\(s\\) 'strict' for json_valid"),
        ([{"kind": "length"}], "at least one bound"),
        ([{"kind": "length", "min_chars": 5, "max_chars": 2}], "min_chars \\(5\\) is above max_chars \\(2\\)"),
        ([{"kind": "length", "min_chars": 5, "max_tokens": 9}], "tokens or in characters, not both"),
        ([{"kind": "contains", "text": []}], "text must be non-empty text or a list"),
        ([{"kind": "python"}], "python needs 'path'"),
        ([{"kind": "python", "path": "/no/such/reward.py"}], "reward file /no/such/reward.py was not found"),
        ([{"kind": "python", "path": "x.py", "timeout_s": 0}], "timeout_s must be a number of seconds above 0"),
        ([{"kind": "reward_model"}], "reward_model needs 'adapter'"),
        ([{"kind": "json_valid", "name": "a/b"}], "name must be 1 to 64"),
        ([{"kind": "json_valid", "name": "x"}, {"kind": "regex", "pattern": "a", "name": "x"}], "used twice"),
    ],
)
def test_bad_specs_say_what_to_change(specs, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_rewards(specs)
    assert err.value.field == "rewards"


def test_python_reward_file_is_read_not_run(tmp_path):
    file = tmp_path / "my_reward.py"
    file.write_text("raise SystemExit('ran at parse time')\n\ndef helper(x):\n    return x\n\nscore_alias = helper\n")
    with pytest.raises(ConfigError, match="no top-level function 'reward' \\(it defines helper\\)"):
        parse_rewards([{"kind": "python", "path": str(file)}])
    (spec,) = parse_rewards([{"kind": "python", "path": str(file), "function": "helper"}])
    assert spec.params["path"] == str(file.resolve()) and spec.params["function"] == "helper"
    assert parse_rewards([{"kind": "python", "path": str(file), "function": "score_alias"}])
    file.write_text("def reward(prompts completions):\n    pass\n")
    with pytest.raises(ConfigError, match="my_reward.py line 1: .*fix the Python syntax"):
        parse_rewards([{"kind": "python", "path": str(file)}])


def test_columns_given_are_checked():
    specs = [{"kind": "exact_match", "column": "answer"}, {"kind": "token_f1", "column": "gold"}]
    assert len(parse_rewards(specs, columns=["prompt", "answer", "gold"])) == 2
    with pytest.raises(ConfigError, match="reads the column 'gold', which the dataset does not have .*answer, prompt"):
        parse_rewards(specs, columns=["prompt", "answer"])


# --- the config field ----------------------------------------------------------------------------------------------
def test_config_field_round_trips_and_is_checked():
    rewards = [{"kind": "json_valid"}, {"kind": "exact_match", "column": "answer", "weight": 2.0}]
    cfg = TrainConfig(dataset="x.jsonl", rewards=rewards)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert TrainConfig().rewards == []
    assert "reward functions" in TrainConfig.field_help()["rewards"]["help"]
    with pytest.raises(ConfigError, match="unknown kind") as err:
        TrainConfig.from_dict({"dataset": "x", "rewards": [{"kind": "jsonvalid"}]})
    assert err.value.field == "rewards"


def test_config_takes_rewards_from_set_overrides_and_text():
    cfg = TrainConfig(dataset="x").with_overrides(["rewards=[{kind: regex, pattern: 'a+'}, {kind: json_valid}]"])
    assert cfg.rewards == [{"kind": "regex", "pattern": "a+"}, {"kind": "json_valid"}]
    # a form's one-line text: a mapping or several, YAML or JSON
    assert TrainConfig.from_dict({"rewards": '{"kind": "json_valid"}'}).rewards == [{"kind": "json_valid"}]
    assert TrainConfig.from_dict({"rewards": "{kind: json_valid}, {kind: think_answer}"}).rewards == [
        {"kind": "json_valid"},
        {"kind": "think_answer"},
    ]
    assert TrainConfig.from_dict({"rewards": ""}).rewards == []
    with pytest.raises(ConfigError, match="cannot read") as err:
        TrainConfig.from_dict({"rewards": "{kind: [json_valid"})
    assert err.value.field == "rewards"
