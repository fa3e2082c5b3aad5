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
        ("method", "complete"),
        ("objective", "kto"),  # not an objective the engine has
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
    assert help_["method"]["choices"][:4] == ("lora", "qlora", "dora", "qdora")
    assert set(help_["method"]["choices"]) >= {"vera", "ia3", "bitfit", "prompt_tuning", "prefix_tuning", "houlsby"}


@pytest.mark.parametrize("flag", ["fused_ops", "packing", "gradient_checkpointing"])
def test_switches_must_be_true_or_false(flag):
    with pytest.raises(ConfigError, match="must be true or false") as err:
        TrainConfig(dataset="x.jsonl", **{flag: "yes"}).validate()
    assert err.value.field == flag


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_epochs", float("inf")),
        ("max_steps", 1e30),
        ("seed", 2**70),
        ("seed", -1),
        ("gradient_accumulation_steps", 1e9),
        ("num_threads", 10**6),
        ("lora_alpha", float("inf")),
        ("lora_alpha", 10**400),
        ("weight_decay", float("inf")),
        ("dpo_beta", float("nan")),
    ],
)
def test_infinite_and_out_of_range_numbers_name_the_field_and_its_range(field, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"dataset": "x", field: value})
    assert err.value.field == field
    assert "finite" in str(err.value) or " to " in str(err.value) or "at most" in str(err.value)


def test_the_bounds_themselves_are_accepted():
    cfg = TrainConfig.from_dict(
        {
            "dataset": "x",
            "seed": 2**32 - 1,
            "max_steps": 10**9,
            "gradient_accumulation_steps": 4096,
            "num_threads": 1024,
        }
    )
    assert (cfg.seed, cfg.max_steps, cfg.gradient_accumulation_steps, cfg.num_threads) == (2**32 - 1, 10**9, 4096, 1024)
