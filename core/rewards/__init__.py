"""Rewards for online RL: built-in verifiers, a person's Python function in a sandbox, and their weighted total.

A run's rewards are listed in its config (``TrainConfig.rewards``), checked by :func:`parse_rewards` into
:class:`RewardSpec` (``spec``), and scored together by :class:`RewardSet` (``reward_set``) into
:class:`RewardScores`. Every reward function follows TRL's contract, ``fn(prompts=[...], completions=[...],
**columns) -> list[float]`` (``base.RewardFn``). The built-in verifiers are in ``verifiers``; a ``python`` reward
runs in a separate, limited process (``sandbox``, whose worker is ``_sandbox_worker``); a ``reward_model`` reward
is built by the engine (it needs torch) and handed to the set.

May import: the standard library, other core modules and jsonschema (pure Python); like the rest of core, never
the ML stack or Qt (import-linter: "Shared pieces are pure Python").
"""

from finetune_studio.core.rewards.base import RewardError, RewardFn, check_scores
from finetune_studio.core.rewards.reward_set import RewardScores, RewardSet
from finetune_studio.core.rewards.spec import COLUMN_KINDS, KINDS, RewardSpec, parse_rewards

__all__ = [
    "COLUMN_KINDS",
    "KINDS",
    "RewardError",
    "RewardFn",
    "RewardScores",
    "RewardSet",
    "RewardSpec",
    "check_scores",
    "parse_rewards",
]
