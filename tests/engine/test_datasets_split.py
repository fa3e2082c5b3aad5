"""Validation split by prompt: seeded, order-independent, and no prompt on both sides."""

from __future__ import annotations

import random

from finetune_studio.engine.datasets.schema import Message, PreferencePair
from finetune_studio.engine.datasets.split import split_by_prompt


def _pairs(n_prompts: int, per_prompt: int) -> list[PreferencePair]:
    return [
        PreferencePair(
            (Message("user", f"prompt {p}"),),
            (Message("assistant", f"good {i}"),),
            (Message("assistant", f"bad {i}"),),
            source_line=p * per_prompt + i,
        )
        for p in range(n_prompts)
        for i in range(per_prompt)
    ]


def test_no_prompt_on_both_sides_and_sizes():
    examples = _pairs(50, 3)
    train, val = split_by_prompt(examples, 0.2, seed=1)
    train_keys, val_keys = {e.prompt_key for e in train}, {e.prompt_key for e in val}
    assert not train_keys & val_keys
    assert len(val_keys) == 10 and len(val) == 30 and len(train) + len(val) == 150
    assert [e.source_line for e in train] == sorted(e.source_line for e in train)  # input order kept


def test_seeded_and_independent_of_row_order():
    examples = _pairs(40, 2)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    val_a = {e.prompt_key for e in split_by_prompt(examples, 0.25, seed=7)[1]}
    val_b = {e.prompt_key for e in split_by_prompt(shuffled, 0.25, seed=7)[1]}
    val_c = {e.prompt_key for e in split_by_prompt(examples, 0.25, seed=8)[1]}
    assert val_a == val_b and val_a != val_c


def test_edge_fractions():
    examples = _pairs(3, 1)
    assert split_by_prompt(examples, 0.0, seed=0) == (examples, [])
    train, val = split_by_prompt(examples, 1.0, seed=0)
    assert len(train) == 1 and len(val) == 2  # training always keeps a prompt
    same_prompt = _pairs(1, 4)
    assert split_by_prompt(same_prompt, 0.5, seed=0) == (same_prompt, [])
