"""The full fine-tune method and the distillation student's settings: what the config refuses, naming the field."""

from __future__ import annotations

import pytest

from finetune_studio.core import methods
from finetune_studio.core.config import ConfigError, TrainConfig


def _config(**kw):
    return TrainConfig(dataset="d.jsonl", **kw)


def test_full_is_a_method_with_its_refusals_in_the_table():
    entry = methods.method("full")
    assert entry.family == "full" and not entry.base_4bit
    assert entry.allows(methods.PAIRS) and entry.allows(methods.MERGE) and entry.allows(methods.SAMPLING)
    assert "4-bit" in entry.refusal(methods.BASE_4BIT)
    assert not entry.allows(methods.DISTRIBUTED) and not entry.allows(methods.REWARD_HEAD)
    for objective in ("sft", "dpo", "grpo", "distill"):
        extra = {"rewards": [{"kind": "json_valid"}]} if objective == "grpo" else {}
        extra |= {"distill_teacher": "default"} if objective == "distill" else {}
        _config(method="full", objective=objective, **extra)  # accepted


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"method": "full", "objective": "reward"}, "objective", "reward model"),
        ({"method": "full", "init_adapter": "abc123"}, "init_adapter", "merged export"),
        ({"method": "full", "compute_dtype": "bf16-mixed"}, "compute_dtype", "rounded away"),
        ({"method": "full", "lora_init": "pissa"}, "lora_init", "choose method lora"),
        ({"method": "full", "loraplus_lr_ratio": 16.0}, "loraplus_lr_ratio", "has none"),
        ({"distill_student_layers": 4}, "distill_student_layers", "set objective to distill"),
        (
            {"objective": "distill", "distill_teacher": "default", "distill_student_layers": -1},
            "distill_student_layers",
            "whole number",
        ),
        (
            {"objective": "distill", "distill_teacher": "default", "distill_student_layers": 4, "init_adapter": "r1"},
            "distill_student_layers",
            "student folder",
        ),
        (
            {"objective": "distill", "distill_teacher": "default", "distill_measure_speed": "yes"},
            "distill_measure_speed",
            "true or false",
        ),
    ],
)
def test_refused_combinations_name_the_field(changes, field, words):
    with pytest.raises(ConfigError, match=words) as err:
        _config(**changes)
    assert err.value.field == field


def test_the_student_fields_round_trip():
    cfg = _config(objective="distill", distill_teacher="default", distill_student_layers=3, distill_measure_speed=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
