"""``--set KEY=VALUE`` overrides: read by ``core.config`` for every command that takes them."""

import pytest

from finetune_studio.core.config import ConfigError, TrainConfig, parse_overrides


def test_values_are_read_as_yaml_and_the_config_is_checked_again():
    cfg = TrainConfig(dataset="data.jsonl")
    changed = cfg.with_overrides(
        ["lora_rank=4", "target_modules=[q_proj, v_proj]", "learning_rate=1e-4", "packing=false"]
    )
    assert changed.lora_rank == 4 and changed.target_modules == ["q_proj", "v_proj"]
    assert changed.learning_rate == 1e-4 and changed.packing is False
    assert changed.dataset == "data.jsonl" and cfg.lora_rank != 4  # the rest kept; the original unchanged


def test_a_later_pair_wins():
    assert parse_overrides(["seed=1", " seed =2"]) == {"seed": 2}


@pytest.mark.parametrize(
    "pair,field,words",
    [
        ("lora_rank", "lora_rank", "--set takes KEY=VALUE"),
        ("target_modules=[q_proj", "target_modules", "cannot read"),
        ("lora_rnk=4", "lora_rnk", "did you mean 'lora_rank'"),
        ("batch_size=-1", "batch_size", "batch_size"),
    ],
)
def test_a_bad_pair_is_a_config_error_naming_the_field(pair, field, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(dataset="data.jsonl").with_overrides([pair])
    assert err.value.field == field and words in str(err.value)
