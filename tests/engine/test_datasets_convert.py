"""`python -m finetune_studio.engine data convert`: every target reads back to the same examples; writes are atomic."""

from __future__ import annotations

import json

import pytest

from finetune_studio.engine.cli.data import main
from finetune_studio.engine.datasets import load_dataset
from finetune_studio.engine.datasets.schema import example_to_dict

TOOLS = [{"name": "add", "description": "add two numbers", "parameters": {"type": "object"}}]
DATA = {
    "sft": [
        {
            "system": "Use tools.",
            "tools": json.dumps(TOOLS),
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
                {"from": "observation", "value": "4"},
                {"from": "gpt", "value": "It is 4."},
            ],
        },
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "bye"},
                {"from": "gpt", "value": "ciao"},
            ]
        },
    ],
    "preference": [
        {
            "conversations": [{"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"},
        },
        {
            "system": "Be kind.",
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "go away"},
        },
    ],
    "unpaired": [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "label": True},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}], "label": False},
    ],
    "text": [{"text": "one document"}, {"text": "another"}],
}
SINGLE_TURN = {
    "sft": [{"instruction": "2+2?", "output": "4"}],
    "preference": [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}],
    "unpaired": [{"prompt": "2+2?", "completion": "4", "label": False}],
    "text": [{"text": "doc"}],
}


def _dicts(ds, keep_train: bool = True):
    out = []
    for ex in ds.examples:
        d = json.dumps(example_to_dict(ex), sort_keys=True)
        out.append(d if keep_train else d.replace(', "train": true', "").replace(', "train": false', ""))
    return out


def _convert(capsys, src, out, target, *extra: str) -> tuple[int, dict]:
    code = main(["convert", str(src), str(out), "--to", target, "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("target", ["trl-conversational", "messages", "llama-factory"])
def test_round_trip(tmp_path, capsys, kind, target):
    src = tmp_path / "src.json"
    src.write_text(json.dumps(DATA[kind]))
    out = tmp_path / ("out.json" if target == "llama-factory" else "out.jsonl")
    code, summary = _convert(capsys, src, out, target)
    assert code == 0 and summary["rows_written"] == 2 and summary["problems"] == []
    before, after = load_dataset(src), load_dataset(out)
    assert after.kind == before.kind == kind
    assert _dicts(after) == _dicts(before)
    if target == "llama-factory":
        assert isinstance(json.loads(out.read_text()), list)
        assert summary["dataset_info"]["out"]["file_name"] == "out.json"


@pytest.mark.parametrize("kind", list(SINGLE_TURN))
def test_round_trip_trl_strings(tmp_path, capsys, kind):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SINGLE_TURN[kind]))
    out = tmp_path / "out.jsonl"
    code, _ = _convert(capsys, src, out, "trl")
    assert code == 0
    assert _dicts(load_dataset(out)) == _dicts(load_dataset(src))
    row = json.loads(out.read_text().splitlines()[0])
    assert all(isinstance(v, (str, bool)) for v in row.values())


def test_messages_keeps_per_turn_weights(tmp_path, capsys):
    src = tmp_path / "src.jsonl"
    src.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q", "loss_weight": 0.0},
                    {"role": "assistant", "content": "a1", "loss_weight": 0.0},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2", "loss_weight": 1.0},
                ]
            }
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert _convert(capsys, src, out, "messages")[0] == 0
    assert _dicts(load_dataset(out)) == _dicts(load_dataset(src))
    assert load_dataset(out).examples[0].messages[1].train is False


def test_rows_the_target_cannot_express_are_reported(tmp_path, capsys):
    src = tmp_path / "src.json"
    src.write_text(json.dumps(DATA["sft"]))  # multi-turn: not expressible as TRL strings
    out = tmp_path / "out.jsonl"
    out.write_text("previous content\n")
    code, _ = _convert(capsys, src, out, "trl", "--force")  # replacing allowed: the conversion itself fails
    assert code == 1
    assert out.read_text() == "previous content\n"  # untouched: never a half-written file
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    mixed = tmp_path / "mixed.json"
    mixed.write_text(
        json.dumps(DATA["sft"] + [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    )
    code, summary = _convert(capsys, mixed, out, "trl", "--force")
    assert code == 0 and summary["rows_written"] == 1
    assert [p["level"] for p in summary["problems"]] == ["dropped", "dropped"]
    assert "use --to trl-conversational" in summary["problems"][0]["message"]


def test_convert_refuses_unusable_input_cleanly(tmp_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    out = tmp_path / "out.jsonl"
    code = main(["convert", str(src), str(out), "--to", "messages"])
    err = capsys.readouterr().err
    assert code == 1 and "is empty" in err and "Traceback" not in err and not out.exists()
