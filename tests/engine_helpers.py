"""Small data files and configs for engine tests."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_studio.core.config import TrainConfig


def write_sft(path: Path, n: int = 40) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"The answer is {2 * i}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def write_dpo(path: Path, n: int = 40) -> Path:
    rows = [
        {"prompt": f"Give the number {i} in JSON.", "chosen": f'{{"n": {i}}}', "rejected": f"The number is {i}."}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def tiny_config(model_dir: Path, dataset: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        dataset=str(dataset),
        max_steps=6,
        batch_size=4,
        learning_rate=1e-2,
        eval_every=0,
        checkpoint_every=0,
        lora_rank=8,
        lora_alpha=16,
        validation_fraction=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    """An in-process event listener."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.type == kind]

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.of("step")]
