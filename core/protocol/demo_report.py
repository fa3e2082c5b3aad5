"""What ``engine demo --json``, ``engine demo --loop --json`` and ``engine demo --rl --json`` answer: the demo task's
scores before and after.

One :class:`DemoReport` (``{"v": 1, "type": "demo_report", ...}``), :class:`DemoLoopReport` (``"demo_loop_report"``)
or :class:`DemoRLReport` (``"demo_rl_report"``) event of :mod:`core.protocol.events` on one JSON line. A score is the
share of held-out prompts answered exactly right (``exact``) and in the required format (``valid``), over ``n``
prompts. Unknown fields are ignored, as for every event.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune_studio.core.protocol.message import EVENT_TYPES, Event, ProtocolError


@dataclass(frozen=True)
class DemoScore:
    """The demo task's score on the held-out prompts."""

    exact: float  # share of exactly right answers (the headline score)
    valid: float  # share of answers in the required format, right or wrong
    n: int
    seconds: float = 0.0

    @classmethod
    def from_fields(cls, data: Any) -> DemoScore | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise TypeError("a score must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class DemoExample:
    """One held-out prompt with the expected answer and the model's answers before and after training."""

    prompt: str
    expected: dict[str, Any]
    before: str = ""
    after: str = ""


def _scores(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, DemoScore | None]:
    return {name: DemoScore.from_fields(data.get(name)) for name in names if name in data}


def _build(cls: type[Event], data: dict[str, Any], scores: tuple[str, ...]) -> Any:
    """``cls`` from a decoded JSON object, its scores and examples built too; ProtocolError if malformed."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        kwargs = {k: v for k, v in data.items() if k in names and k not in scores}
        kwargs.update(_scores(data, scores))
        if "examples" in kwargs:
            kwargs["examples"] = tuple(DemoExample(**e) for e in kwargs["examples"])
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {cls.type} event: {exc}") from None


@dataclass(frozen=True)
class DemoReport(Event):
    """``engine demo``: one training run on the demo task, scored before and after."""

    type: ClassVar[str] = "demo_report"
    task: str = ""
    model: str = ""
    objective: str = ""
    method: str = ""
    steps: int = 0
    learning_rate: float = 0.0
    batch_size: int = 0
    lora_rank: int = 0
    max_length: int = 0
    eval_prompts: int = 0
    before: DemoScore | None = None  # None with --skip-before
    after: DemoScore | None = None
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    run_id: str = ""
    run_dir: str = ""
    adapter_dir: str = ""
    final_loss: float | None = None
    examples: tuple[DemoExample, ...] = ()

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DemoReport:
        built: DemoReport = _build(cls, data, ("before", "after"))
        return built


@dataclass(frozen=True)
class DemoLoopReport(Event):
    """``engine demo --loop``: SFT, sampled candidates labelled by the task's scorer, DPO; scored at each stage."""

    type: ClassVar[str] = "demo_loop_report"
    eval_prompts: int = 0
    before: DemoScore | None = None
    after_sft: DemoScore | None = None
    after_dpo: DemoScore | None = None
    pairs: int = 0
    ties: int = 0
    snapshot: str = ""
    sft_run: str = ""
    dpo_run: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DemoLoopReport:
        built: DemoLoopReport = _build(cls, data, ("before", "after_sft", "after_dpo"))
        return built


@dataclass(frozen=True)
class DemoRLReport(Event):
    """``engine demo --rl``: SFT, then the loop's DPO and GRPO each from the SFT adapter; scored at each stage.

    ``curves`` holds GRPO's figures per optimizer step by name (``reward``, ``reward_std``, ``reward/<name>``,
    ``kl``, ``completion_length``, ``clip_fraction``, ``loss``), each a list over steps 1..N, and the validation
    reward at each evaluation (``eval_reward`` at the steps in ``eval_step``); ``seconds`` each
    stage's wall time (``sft``, ``dpo``, ``grpo``, and each scoring as ``score_<stage>``); ``settings`` the
    command's settings. ``after_dpo`` and ``dpo_run`` are empty when the DPO stage was left out (``--no-dpo``).
    """

    type: ClassVar[str] = "demo_rl_report"
    eval_prompts: int = 0
    before: DemoScore | None = None
    after_sft: DemoScore | None = None
    after_dpo: DemoScore | None = None
    after_grpo: DemoScore | None = None
    sft_run: str = ""
    dpo_run: str = ""
    grpo_run: str = ""
    pairs: int = 0  # the DPO stage's labelled pairs
    grpo_best_step: int = 0  # the GRPO step scored: the best validation reward (0: the last step, no validation)
    curves: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> DemoRLReport:
        built: DemoRLReport = _build(cls, data, ("before", "after_sft", "after_dpo", "after_grpo"))
        return built


EVENT_TYPES.update({cls.type: cls for cls in (DemoReport, DemoLoopReport, DemoRLReport)})
