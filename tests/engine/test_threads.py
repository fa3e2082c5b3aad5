"""The engine's CPU thread count: the config value, OMP_NUM_THREADS, or one fewer than the physical cores."""

import os

import psutil
import pytest
import torch

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.engine.train.threads import apply_threads, auto_threads, physical_cores, resolve_threads


def test_auto_leaves_one_physical_core_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    physical = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))
    assert physical_cores() == physical
    assert auto_threads() == max(1, physical - 1)
    assert resolve_threads(0) == auto_threads()


def test_config_value_then_environment_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(0) == 3
    assert resolve_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert resolve_threads(0) == auto_threads()


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_config_field_validates():
    assert TrainConfig().num_threads == 0
    assert TrainConfig.from_dict(TrainConfig(num_threads=3).to_dict()).num_threads == 3
    with pytest.raises(ConfigError, match="num_threads"):
        TrainConfig(num_threads=-1)
