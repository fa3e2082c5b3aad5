import json

import pytest
import yaml

from finetune_studio.core.config import ConfigError, TrainConfig


def test_defaults_validate_and_round_trip_json_and_yaml():
    cfg = TrainConfig(dataset="data.jsonl", method="qdora", objective="dpo", lora_rank=4)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert cfg.quantized and cfg.uses_dora


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"dataset": "x", "learning_rte": 1e-4})
    assert err.value.field == "learning_rte"
    assert "learning_rate" in str(err.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("method", "full"),
        ("objective", "ppo"),
        ("max_steps", 0),
        ("batch_size", -1),
        ("learning_rate", 5),
        ("lora_rank", 2.5),
        ("dpo_beta", 0),
        ("optimizer", "sgd"),
        ("validation_fraction", 0.95),
        ("target_modules", []),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"dataset": "x", field: value})
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_strings_from_forms_and_yaml_are_coerced():
    cfg = TrainConfig.from_dict(
        {
            "learning_rate": "1e-4",
            "max_steps": "30",
            "use_rslora": "true",
            "target_modules": "q_proj, v_proj",
            "lora_alpha": 8,
        }
    )
    assert cfg.learning_rate == 1e-4 and cfg.max_steps == 30 and cfg.use_rslora is True
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.lora_alpha == 8.0


def test_load_reports_unparseable_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("model: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse c.yaml"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="file not found"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_every_field_has_help():
    help_ = TrainConfig.field_help()
    assert all(meta["help"] for meta in help_.values())
    assert help_["method"]["choices"] == ("lora", "qlora", "dora", "qdora")


@pytest.mark.parametrize("flag", ["fused_ops", "packing", "gradient_checkpointing"])
def test_switches_must_be_true_or_false(flag):
    with pytest.raises(ConfigError, match="must be true or false") as err:
        TrainConfig(dataset="x.jsonl", **{flag: "yes"}).validate()
    assert err.value.field == flag
