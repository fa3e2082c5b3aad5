"""A run's reward functions together: each one's scores, and their weighted total."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from finetune_studio.core.rewards.base import RewardError, RewardFn, check_scores
from finetune_studio.core.rewards.spec import RewardSpec, parse_rewards
from finetune_studio.core.rewards.verifiers import CountTokens, build


@dataclass(frozen=True)
class RewardScores:
    """The scores of one batch: ``by_function[name][i]`` for completion ``i``, and ``total[i]``, their sum
    weighted by each function's weight."""

    by_function: dict[str, list[float]]
    total: list[float]

    def means(self) -> dict[str, float]:
        """Each function's mean score over the batch (0.0 for an empty batch)."""
        return {name: sum(s) / len(s) if s else 0.0 for name, s in self.by_function.items()}


class RewardSet:
    """The reward functions of ``specs`` (checked :class:`RewardSpec`s, or the config's raw ``rewards`` list).

    ``learned(spec) -> RewardFn`` builds the function for a ``reward_model`` spec: the engine passes one (a reward
    model needs torch, which core cannot import), the app one that asks its generation worker. ``count_tokens``
    counts an answer's tokens for ``length`` rewards (the model's tokenizer; see ``verifiers``). ``python`` rewards
    run in a sandboxed worker process each (``core.rewards.sandbox``), started at the first score: call
    :meth:`close` (or use the set as a context manager) to end them.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec] | Sequence[Mapping[str, Any]],
        learned: Callable[[RewardSpec], RewardFn] | None = None,
        *,
        count_tokens: CountTokens | None = None,
    ):
        if all(isinstance(s, RewardSpec) for s in specs):
            self.specs: list[RewardSpec] = [s for s in specs if isinstance(s, RewardSpec)]
        else:
            self.specs = parse_rewards(list(specs))
        self._closers: list[Callable[[], None]] = []
        self._functions: dict[str, RewardFn] = {}
        try:
            for spec in self.specs:
                self._functions[spec.name] = self._build(spec, learned, count_tokens)
        except BaseException:
            self.close()
            raise

    def _build(
        self, spec: RewardSpec, learned: Callable[[RewardSpec], RewardFn] | None, count_tokens: CountTokens | None
    ) -> RewardFn:
        if spec.kind == "python":
            from finetune_studio.core.rewards.sandbox import SandboxedReward

            fn = SandboxedReward.from_spec(spec)
            self._closers.append(fn.close)
            return fn
        if spec.kind == "reward_model":
            if learned is None:
                raise RewardError(
                    spec.name, "a reward model is scored by the engine (or the app's generation worker); none was given"
                )
            return learned(spec)
        return build(spec, count_tokens)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.specs}

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]] | None = None
    ) -> RewardScores:
        """Every function's scores for ``completions`` (answers to ``prompts``, one each; ``columns`` the dataset's
        other columns, one value per completion) and their weighted total. Raises :class:`RewardError`."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompt(s) for {n} completion(s): give one prompt per completion")
        cols = {k: list(v) for k, v in (columns or {}).items()}
        for key in ("prompts", "completions"):
            cols.pop(key, None)
        by_function: dict[str, list[float]] = {}
        for spec in self.specs:
            fn = self._functions[spec.name]
            try:
                raw = fn(prompts=list(prompts), completions=list(completions), **cols)
            except RewardError:
                raise
            except Exception as exc:
                raise RewardError(spec.name, f"failed: {type(exc).__name__}: {exc}") from exc
            by_function[spec.name] = check_scores(spec.name, raw, n)
        total = [sum(self.weights[name] * scores[i] for name, scores in by_function.items()) for i in range(n)]
        return RewardScores(by_function=by_function, total=total)

    def close(self) -> None:
        """End the sandboxed workers (safe to call twice)."""
        closers, self._closers = self._closers, []
        for close in closers:
            close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
