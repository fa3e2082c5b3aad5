"""The demo task: its generated data, its scorer, and the demo command end to end on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from finetune_studio.core.protocol.demo_report import DemoReport
from finetune_studio.core.protocol.events import parse_event
from finetune_studio.engine.demo import task as demo

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "resources" / "datasets"


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo", DATA / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_demo", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _generator()


@pytest.fixture(scope="module")
def built(gen):
    return gen.build()


def _text(prompt: str) -> str:
    return prompt.rsplit("Text: ", 1)[1]


def test_generator_is_deterministic_and_matches_the_committed_files(gen, built):
    assert gen.build() == built
    assert gen.build(seed=gen.SEED + 1) != built
    for name, rows in built.items():
        assert (DATA / name).read_text(encoding="utf-8") == gen.dumps(rows), f"{name} is stale: rerun make_demo.py"
    assert len(built["demo_sft.jsonl"]) >= 200 and len(built["demo_preference.jsonl"]) >= 200
    assert 50 <= len(built["demo_eval.jsonl"]) <= 100
    assert sum((DATA / name).stat().st_size for name in built) < 1_000_000


def test_the_demo_reads_the_committed_files():
    assert [r["prompt"] for r in demo.read_jsonl(demo.EVAL_FILE)][:1]
    assert demo.SFT_FILE.is_file() and demo.PREFERENCE_FILE.is_file()


def test_eval_prompts_and_people_are_not_in_training(built):
    sft = built["demo_sft.jsonl"]
    pref = built["demo_preference.jsonl"]
    train_prompts = {r["messages"][0]["content"] for r in sft} | {r["prompt"] for r in pref}
    train_names = {json.loads(r["messages"][1]["content"])["name"] for r in sft} | {
        json.loads(r["chosen"])["name"] for r in pref
    }
    eval_rows = built["demo_eval.jsonl"]
    assert len({r["prompt"] for r in eval_rows}) == len(eval_rows)
    for row in eval_rows:
        assert row["prompt"] not in train_prompts
        assert row["expected"]["name"] not in train_names


def test_answers_are_grounded_in_the_text(built):
    """Every expected value can be read off its sentence: the task is learnable, not memorisation."""
    pairs = [(r["messages"][0]["content"], json.loads(r["messages"][1]["content"])) for r in built["demo_sft.jsonl"]]
    pairs += [(r["prompt"], r["expected"]) for r in built["demo_eval.jsonl"]]
    jobs = sum(1 for _p, e in pairs if e["job"] is not None)
    assert 0.2 < jobs / len(pairs) < 0.8  # both cases are common
    for prompt, exp in pairs:
        text = _text(prompt)
        assert exp["name"] in text and exp["city"] in text and str(exp["age"]) in text
        assert (exp["job"] in text) if exp["job"] is not None else not any(j in text for j in _generator().JOBS)


def test_sft_answers_are_compact_valid_json(built):
    for row in built["demo_sft.jsonl"]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert demo.parse_answer(assistant["content"]) is not None
        assert list(json.loads(assistant["content"])) == list(demo.KEYS)


def test_preference_chosen_scores_one_and_rejected_zero(built):
    rows = built["demo_preference.jsonl"]
    assert len({r["rejected"].split("{")[0][:12] for r in rows}) > 3  # several kinds of wrong answer
    for row in rows:
        expected = json.loads(row["chosen"])
        assert demo.score_answer(row["chosen"], expected) == (True, True)
        assert demo.score_answer(row["rejected"], expected)[1] is False
        assert row["chosen"] != row["rejected"]


@pytest.mark.parametrize(
    "answer, valid, exact",
    [
        ('{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}', True, True),
        ('  {"name":"Ana Silva","age":31,"city":"Porto","job":null}\n', True, True),
        ('{\n  "job": null,\n  "city": "Porto",\n  "age": 31,\n  "name": "Ana Silva"\n}', True, True),
        ('{"name": "Ana Silva", "age": 32, "city": "Porto", "job": null}', True, False),
        ('{"name": "Ana", "age": 31, "city": "Porto", "job": null}', True, False),
        ('{"name": "Ana Silva", "age": 31, "city": "Porto", "job": "nurse"}', True, False),
        ('{"name": "Ana Silva", "age": "31", "city": "Porto", "job": null}', False, False),
        ('{"name": "Ana Silva", "age": 31.0, "city": "Porto", "job": null}', False, False),
        ('{"name": "Ana Silva", "age": true, "city": "Porto", "job": null}', False, False),
        ('{"name": "Ana Silva", "age": 31, "city": "Porto"}', False, False),
        ('{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null, "country": "PT"}', False, False),
        ('{"name": "Ana Silva", "age": 31, "city": "Porto", "job": 7}', False, False),
        ('{"name": ["Ana Silva"], "age": 31, "city": "Porto", "job": null}', False, False),
        ('```json\n{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}\n```', False, False),
        ('JSON: {"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}', False, False),
        ('[{"name": "Ana Silva", "age": 31, "city": "Porto", "job": null}]', False, False),
        ("Ana Silva is 31 and lives in Porto.", False, False),
        ('{"name": "Ana Silva", "age": 31, "city": "Porto", "job": nu', False, False),
        ("", False, False),
    ],
)
def test_scorer(answer, valid, exact):
    expected = {"name": "Ana Silva", "age": 31, "city": "Porto", "job": None}
    assert demo.score_answer(answer, expected) == (valid, exact)


def test_score_answers_aggregates():
    expected = [{"name": "A B", "age": 20, "city": "Oslo", "job": None}] * 4
    answers = [json.dumps(expected[0]), json.dumps({**expected[0], "age": 21}), "prose", json.dumps(expected[0])]
    score = demo.score_answers(answers, expected)
    assert (score.exact, score.valid, score.n) == (0.5, 0.75, 4)
    with pytest.raises(ValueError):
        demo.score_answers(answers[:2], expected)


def test_demo_runs_end_to_end_on_the_tiny_model(tiny_model_dir, capsys):
    code = demo.main(
        [
            "--model",
            str(tiny_model_dir),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "512",
            "--eval-limit",
            "3",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    typed = parse_event(out[0])  # one typed, versioned event
    assert isinstance(typed, DemoReport) and typed.after is not None and typed.after.n == 3
    assert typed.examples[0].expected == report["examples"][0]["expected"]
    assert report["steps"] == 2 and report["objective"] == "sft" and report["eval_prompts"] == 3
    for side in ("before", "after"):
        assert report[side]["n"] == 3 and 0 <= report[side]["exact"] <= report[side]["valid"] <= 1
    assert Path(report["adapter_dir"], "adapter_config.json").is_file()
    assert len(report["examples"]) == 3


def test_demo_dpo_runs_on_the_tiny_model(tiny_model_dir, capsys):
    code = demo.main(
        [
            "--model",
            str(tiny_model_dir),
            "--objective",
            "dpo",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--max-length",
            "512",
            "--eval-limit",
            "1",
            "--max-new-tokens",
            "2",
            "--skip-before",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "valid format" in out and "DPO" in out
    assert "before:" not in out  # the base model was not scored


def test_demo_rejects_a_bad_setting(capsys):
    assert demo.main(["--steps", "0"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_the_loop_labels_exact_over_valid_over_invalid_and_equal_scores_tie():
    from finetune_studio.engine.demo.loop import decisions, label

    expected = {"name": "Ada Lee", "age": 36, "city": "Oslo", "job": None}
    exact = '{"name": "Ada Lee", "age": 36, "city": "Oslo", "job": null}'
    wrong = '{"name": "Ada Lee", "age": 37, "city": "Oslo", "job": null}'
    assert [label(a, expected) for a in (exact, wrong, "Ada is 36.", "```json\n" + exact + "\n```")] == [2, 1, 0, 0]
    assert decisions([2, 1, 0, 0]) == [(0, 1, "a"), (0, 2, "a"), (0, 3, "a"), (1, 2, "a"), (1, 3, "a"), (2, 3, "tie")]
    assert decisions([0, 2]) == [(0, 1, "b")]
