"""Failures become messages that say what to change."""

import torch

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.engine.models import ModelError
from finetune_studio.engine.train.errors import classify


def test_out_of_memory_names_the_settings_to_lower():
    config = TrainConfig(dataset="d.jsonl", batch_size=8, max_length=2048)
    kind, message = classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), config, 12)
    assert kind == "oom"
    assert "step 12" in message and "batch_size (now 8; try 4" in message and "max_length (now 2048)" in message
    assert "gradient_checkpointing" in message and "qlora" in message and "8-bit AdamW" in message
    kind, message = classify(
        RuntimeError("CUDA error: out of memory"),
        config.replace(method="qlora", gradient_checkpointing=True, batch_size=1),
        0,
    )
    assert kind == "oom" and "qlora" not in message and "batch_size" not in message


def test_each_failure_family_has_its_kind():
    assert classify(ConfigError("lora_rank", "must be at least 1"), None, 0) == (
        "config",
        "Invalid config: lora_rank: must be at least 1",
    )
    assert classify(ModelError("no config.json"), None, 0)[0] == "model"
    assert classify(FileNotFoundError(2, "No such file", "/x/d.jsonl"), None, 0) == (
        "data",
        "File not found: /x/d.jsonl",
    )
    kind, message = classify(ValueError("boom"), None, 3)
    assert kind == "error" and message == "Training failed at step 3: ValueError: boom"
