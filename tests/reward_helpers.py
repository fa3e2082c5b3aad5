"""Synthetic preference data and a small reward run for the reward-model tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from engine_helpers import Recorder, tiny_config

from finetune_studio.core.config import TrainConfig

WORDS = "quick brown lazy dog capital Paris sea waves salt wind gull hello world name age answer".split()
MARK = "fox"  # every chosen answer holds it, no rejected one does; both sides are 4 to 6 words long


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        chosen = rng.sample(WORDS, rng.randint(3, 5))
        chosen.insert(rng.randint(0, len(chosen)), MARK)
        rejected = rng.sample(WORDS, rng.randint(4, 6))
        out.append(
            {"prompt": f"Say something about item {i}.", "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
        )
    return out


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def reward_config(model_dir: Path, data: Path, **kw) -> TrainConfig:
    settings = dict(
        objective="reward",
        max_steps=40,
        batch_size=8,
        learning_rate=1e-2,
        eval_every=10,
        validation_fraction=0.2,
        compute_dtype="float32",
        num_threads=1,
    )
    return tiny_config(model_dir, data, **{**settings, **kw})


def train_reward_model(model_dir: Path, root: Path, **kw):
    """A reward run on 200 synthetic pairs in a data home of its own under ``root``: (result, events, config)."""
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    data = write_pairs(root / "pairs.jsonl", synthetic_pairs(200, seed=0))
    config = reward_config(model_dir, data, **kw)
    events = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_STUDIO_HOME", str(root / "home"))
        result = train_run(config, reporter=Reporter(extra=events))
    assert result.status == "completed" and result.adapter_dir is not None
    return result, events, config
