"""Training objectives: each turns a batch into a loss and its metrics, and says what it needs.

The recipe (``engine.train.recipe``) builds the objective its config names (``objective``) from :data:`REGISTRY`
and trains with it without knowing which it is. A new objective (a reward model, an online RL objective,
distillation) is a new module here with an :class:`Objective` subclass, registered with :func:`register`; its loss
function belongs in ``engine.train.losses`` beside the others. Its name must also be one the config accepts
(``core.config.OBJECTIVES``).

May import what the rest of ``train`` may: ``datasets``, the shared engine modules, kernels, core and the ML
stack; never ``generate``, ``export``, ``demo`` or the CLI (import-linter: "The engine is layered").
"""

from __future__ import annotations

from finetune_studio.core.config import ConfigError
from finetune_studio.engine.train.objectives.base import Objective, Progress, TrainedModel
from finetune_studio.engine.train.objectives.distill import Distill
from finetune_studio.engine.train.objectives.dpo import DPO
from finetune_studio.engine.train.objectives.grpo import GRPO
from finetune_studio.engine.train.objectives.ppo import PPO
from finetune_studio.engine.train.objectives.reward import Reward
from finetune_studio.engine.train.objectives.sft import SFT

__all__ = [
    "DPO",
    "GRPO",
    "PPO",
    "REGISTRY",
    "SFT",
    "Reward",
    "Objective",
    "Progress",
    "TrainedModel",
    "objective_class",
    "register",
]

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (SFT, DPO, Reward, Distill, GRPO, PPO)}


def register(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` the objective named ``cls.name`` (a class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name``."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError("objective", f"must be one of {', '.join(REGISTRY)}, not {name!r}")
    return cls
