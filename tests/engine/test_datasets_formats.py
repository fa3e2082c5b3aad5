"""Row layouts: each one detected and normalised into the internal form; bad rows dropped with a reason."""

from __future__ import annotations

import json

import pytest

from finetune_studio.engine.datasets import DatasetError, load_dataset
from finetune_studio.engine.datasets.schema import Conversation, Message, PreferencePair, TextExample, UnpairedExample

U, A, S, T = "user", "assistant", "system", "tool"


def _load(tmp_path, rows, mapping=None, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset(path, mapping)


def _by_line(ds):
    return {p.line: p.message for p in ds.problems if p.line is not None}


# --- SFT ----------------------------------------------------------------------------------------------------------


def test_alpaca_with_system_and_history(tmp_path):
    ds = _load(
        tmp_path,
        [{"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.", "history": [["2+2?", "4"]]}],
    )
    assert (ds.format, ds.kind) == ("alpaca", "sft")
    assert ds.examples[0].messages == (
        Message(S, "Be brief."),
        Message(U, "2+2?"),
        Message(A, "4"),
        Message(U, "And 3+3?"),
        Message(A, "6"),
    )


def test_sharegpt_with_tools_function_calls_and_observations(tmp_path):
    tools = [{"name": "add", "description": "add numbers", "parameters": {"type": "object"}}]
    row = {
        "system": "You can call tools.",
        "tools": json.dumps(tools),
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "It is 4."},
        ],
    }
    ds = _load(tmp_path, [row])
    assert ds.format == "sharegpt"
    ex = ds.examples[0]
    assert ex.tools == ({"type": "function", "function": tools[0]},)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    assert ex.messages == (
        Message(S, "You can call tools."),
        Message(U, "2+2?"),
        Message(A, "", (call,)),
        Message(T, "4"),
        Message(A, "It is 4."),
    )


def test_openai_messages_typed_parts_weights_and_tool_calls(tmp_path):
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look:"}, {"type": "text", "value": "hi"}],
                "loss_weight": 0.0,
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "greet", "arguments": '{"who": "you"}'}}
                ],
            },
            {"role": "tool", "content": "done"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}], "loss_weight": 1.0},
        ]
    }
    ds = _load(
        tmp_path,
        [
            row,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                    {"role": "assistant", "content": "A cat."},
                ]
            },
        ],
    )
    assert ds.format == "messages" and len(ds.examples) == 1
    call = {"type": "function", "function": {"name": "greet", "arguments": {"who": "you"}}, "id": "c1"}
    assert ds.examples[0].messages == (
        Message(U, "Look:\nhi", (), False),
        Message(A, "", (call,)),
        Message(T, "done"),
        Message(A, "Hello!", (), True),
    )
    assert "'image' part" in _by_line(ds)[2] and ds.dropped


def test_prompt_completion_trains_on_the_completion_only(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {
            "prompt": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
            ],
            "completion": [{"role": "assistant", "content": "ciao"}],
        },
    ]
    ds = _load(tmp_path, rows)
    assert ds.format == "prompt-completion"
    assert ds.examples[0].messages == (Message(U, "2+2?"), Message(A, "4"))
    assert ds.examples[1].messages == (
        Message(U, "hi"),
        Message(A, "hello", (), False),
        Message(U, "bye"),
        Message(A, "ciao"),
    )


def test_plain_text(tmp_path):
    ds = _load(tmp_path, [{"text": "Once upon a time."}, {"text": "   "}])
    assert (ds.format, ds.kind) == ("text", "text")
    assert ds.examples == [TextExample("Once upon a time.", 1)]
    assert _by_line(ds) == {2: "empty 'text'"}


def test_unknown_role_is_dropped_with_a_hint_and_the_mapping_fixes_it(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot2", "value": "yo"}]}]
    with pytest.raises(DatasetError, match="no usable rows") as err:
        _load(tmp_path, rows)
    assert "unknown role 'bot2'" in err.value.problems[0].message and '"roles"' in err.value.problems[0].message
    ds = _load(tmp_path, rows, {"roles": {"bot2": "assistant"}})
    assert ds.examples[0].messages[1] == Message(A, "yo")


def test_conversation_without_answer_is_dropped(tmp_path):
    ds = _load(
        tmp_path,
        [
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        ],
    )
    assert len(ds.examples) == 1 and _by_line(ds) == {1: "no assistant turn to train on"}


# --- preference ---------------------------------------------------------------------------------------------------


def test_trl_standard(tmp_path):
    ds = _load(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert (ds.format, ds.kind) == ("trl", "preference")
    assert ds.examples[0] == PreferencePair(
        (Message(U, "2+2?"),), (Message(A, "4"),), (Message(A, "5"),), source_line=1
    )


def test_trl_implicit_prompt_strings(tmp_path):
    rows = [
        {"chosen": "What is 2+2? It is 4.", "rejected": "What is 2+2? It is 5."},
        # one answer is a prefix of the other: both answers keep text, the prompt stops at a word boundary
        {"chosen": "Capital of France? Paris, of course.", "rejected": "Capital of France? Paris"},
        # identical: dropped, it teaches nothing
        {"chosen": "Same? Yes.", "rejected": "Same? Yes."},
        # nothing shared: dropped with a reason
        {"chosen": "Yes", "rejected": "No"},
        {"chosen": "User: hi\nAssistant: Hello there", "rejected": "User: hi\nAssistant: Go away"},
    ]
    ds = _load(tmp_path, rows)
    assert ds.format == "trl-implicit"
    first, prefix, marker = ds.examples
    assert (first.prompt, first.chosen, first.rejected) == (
        (Message(U, "What is 2+2? It is"),),
        (Message(A, "4."),),
        (Message(A, "5."),),
    )
    assert prefix.prompt == (Message(U, "Capital of France?"),)
    assert (prefix.chosen, prefix.rejected) == ((Message(A, "Paris, of course."),), (Message(A, "Paris"),))
    assert marker.prompt == (Message(U, "User: hi\nAssistant:"),)
    assert marker.chosen == (Message(A, " Hello there"),)
    problems = _by_line(ds)
    assert "identical" in problems[3] and "share no prompt" in problems[4]
    assert ds.dropped == {"pairs whose chosen and rejected are identical": 1, "pairs whose answers share no prompt": 1}


def test_trl_implicit_prompt_conversational(tmp_path):
    q = {"role": "user", "content": "Hi"}
    rows = [
        {
            "chosen": [q, {"role": "assistant", "content": "Hello!"}],
            "rejected": [q, {"role": "assistant", "content": "Go."}],
        },
        # rejected continues past the shared answer: prompt stops before the last shared assistant turn
        {
            "chosen": [q, {"role": "assistant", "content": "Hello!"}],
            "rejected": [
                q,
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "?"},
                {"role": "assistant", "content": "Nothing."},
            ],
        },
        {
            "chosen": [q, {"role": "assistant", "content": "Same"}],
            "rejected": [q, {"role": "assistant", "content": "Same"}],
        },
    ]
    ds = _load(tmp_path, rows)
    assert ds.format == "trl-implicit-conversational" and len(ds.examples) == 2
    assert ds.examples[0].prompt == (Message(U, "Hi"),)
    assert ds.examples[0].chosen == (Message(A, "Hello!"),) and ds.examples[0].rejected == (Message(A, "Go."),)
    assert ds.examples[1].prompt == (Message(U, "Hi"),)
    assert ds.examples[1].chosen == (Message(A, "Hello!"),) and len(ds.examples[1].rejected) == 3
    assert "identical" in _by_line(ds)[3]


def test_trl_conversational_explicit_prompt(tmp_path):
    ds = _load(
        tmp_path,
        [
            {
                "prompt": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go"}],
            }
        ],
    )
    assert ds.format == "trl-conversational"
    assert ds.examples[0].prompt == (Message(S, "Be nice"), Message(U, "Hi"))


def test_anthropic_hh(tmp_path):
    base = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke."
    ds = _load(
        tmp_path,
        [
            {
                "chosen": base + "\n\nAssistant: Why did the chicken cross the road?",
                "rejected": base + "\n\nAssistant: No.",
            }
        ],
    )
    assert ds.format == "hh"
    ex = ds.examples[0]
    assert ex.prompt == (Message(U, "Hi"), Message(A, "Hello, how can I help?"), Message(U, "Tell me a joke."))
    assert ex.chosen == (Message(A, "Why did the chicken cross the road?"),)
    assert ex.rejected == (Message(A, "No."),)


def test_ultrafeedback_with_scores(tmp_path):
    def side(answer):
        return [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": answer}]

    rows = [
        {
            "prompt": "Name a colour",
            "chosen": side("Blue"),
            "rejected": side("Seven"),
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        },
        {
            "prompt": "Name a colour",
            "chosen": side("Red"),
            "rejected": side("Green"),
            "score_chosen": 3.0,
            "score_rejected": 8.0,
        },
    ]
    ds = _load(tmp_path, rows)
    assert ds.format == "ultrafeedback" and len(ds.examples) == 2
    assert ds.examples[0].prompt == (Message(U, "Name a colour"),)
    assert ds.examples[0].chosen == (Message(A, "Blue"),)
    assert "below score_rejected" in _by_line(ds)[2]


def test_llama_factory_alpaca_and_sharegpt_ranking(tmp_path):
    alpaca = _load(tmp_path, [{"instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": "bye"}])
    assert alpaca.format == "alpaca-ranking"
    assert alpaca.examples[0].prompt == (Message(U, "Translate\nbonjour"),)
    sharegpt = _load(
        tmp_path,
        [
            {
                "conversations": [{"from": "human", "value": "hi"}],
                "chosen": {"from": "gpt", "value": "hello"},
                "rejected": {"from": "gpt", "value": "go"},
            }
        ],
        name="sg.jsonl",
    )
    assert sharegpt.format == "sharegpt-ranking"
    assert sharegpt.examples[0] == PreferencePair(
        (Message(U, "hi"),), (Message(A, "hello"),), (Message(A, "go"),), source_line=1
    )


def test_chosen_and_rejected_messages_with_typed_parts(tmp_path):
    def side(answer):
        return [
            {"role": "system", "content": [{"type": "text", "value": "sys"}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": answer}], "loss_weight": 1.0},
        ]

    ds = _load(tmp_path, [{"chosen_messages": side("good"), "rejected_messages": side("bad")}])
    assert ds.format == "chosen-rejected-messages"
    ex = ds.examples[0]
    assert ex.prompt == (Message(S, "sys"), Message(U, "q"))  # weights do not apply to pairs
    assert (ex.chosen, ex.rejected) == ((Message(A, "good"),), (Message(A, "bad"),))


# --- unpaired (KTO) -----------------------------------------------------------------------------------------------


def test_kto_prompt_completion_label(tmp_path):
    ds = _load(
        tmp_path,
        [
            {"prompt": "2+2?", "completion": "4", "label": True},
            {"prompt": "2+2?", "completion": "5", "label": "false"},
            {"prompt": "2+2?", "completion": "6", "label": "maybe"},
        ],
    )
    assert (ds.format, ds.kind) == ("kto", "unpaired")
    assert [ex.label for ex in ds.examples] == [True, False]
    assert "'label' must be true or false" in _by_line(ds)[3]


def test_messages_with_boolean_label(tmp_path):
    ds = _load(
        tmp_path,
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "label": False}],
    )
    assert ds.format == "messages-kto"
    assert ds.examples[0] == UnpairedExample((Message(U, "hi"),), (Message(A, "yo"),), False, 1)


# --- mapping and checks -------------------------------------------------------------------------------------------


def test_mapping_renames_columns(tmp_path):
    rows = [{"question": "2+2?", "good": "4", "bad": "5"}]
    with pytest.raises(DatasetError, match="could not recognise.*question"):
        _load(tmp_path, rows)
    ds = _load(tmp_path, rows, {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert ds.format == "trl" and ds.examples[0].chosen == (Message(A, "4"),)


def test_mapping_forces_a_format_and_names_custom_turn_keys(tmp_path):
    rows = [{"dialog": [{"speaker": "client", "utterance": "hi"}, {"speaker": "agent", "utterance": "hello"}]}]
    ds = _load(
        tmp_path,
        rows,
        {
            "format": "messages",
            "messages": "dialog",
            "role_key": "speaker",
            "content_key": "utterance",
            "roles": {"client": "user", "agent": "assistant"},
        },
    )
    assert ds.examples[0].messages == (Message(U, "hi"), Message(A, "hello"))


@pytest.mark.parametrize(
    "mapping,match",
    [
        ({"promt": "q"}, "unknown mapping key 'promt'"),
        ({"prompt": "question"}, "names column 'question'"),
        ({"format": "alpacca"}, "unknown format 'alpacca'"),
        ({"roles": {"bot": "robot"}}, "'roles' must map"),
    ],
)
def test_bad_mappings_are_refused(tmp_path, mapping, match):
    with pytest.raises(DatasetError, match=match):
        _load(tmp_path, [{"text": "x"}], mapping)


def test_exact_duplicates_are_reported(tmp_path):
    row = {"instruction": "a", "output": "b"}
    ds = _load(tmp_path, [row, {"instruction": "c", "output": "d"}, row])
    assert len(ds.examples) == 3
    assert _by_line(ds) == {3: "exact duplicate of line 1"}


def test_many_identical_problems_are_summed_up(tmp_path):
    rows = [{"instruction": f"q{i}", "output": ""} for i in range(50)] + [{"instruction": "ok", "output": "yes"}]
    ds = _load(tmp_path, rows)
    assert len(ds.examples) == 1 and ds.dropped == {"rows with an empty 'output'": 50}
    listed = [p for p in ds.problems if p.line is not None]
    assert len(listed) == 20
    assert any(p.message.startswith("... and 30 more like this") for p in ds.problems)


def test_prompt_key_groups_the_same_prompt(tmp_path):
    ds = _load(
        tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    )
    assert ds.examples[0].prompt_key == ds.examples[1].prompt_key
    assert isinstance(
        _load(
            tmp_path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
        ).examples[0],
        Conversation,
    )
