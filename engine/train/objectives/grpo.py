"""Group Relative Policy Optimisation: answers sampled from the policy, scored, and compared within their group.

For each prompt of a step the policy samples ``grpo_group_size`` (G) answers with the engine's own decode loop
(:mod:`engine.decoding`: one prefill per prompt, a preallocated KV cache, the adapters live, the model in eval mode
and inference mode). The rewards (``TrainConfig.rewards``, scored by ``core.rewards.RewardSet``) score each answer,
and its advantage is its reward against its group's, ``(r - mean) / (std + eps)`` (``grpo_loss`` dr_grpo: ``r -
mean``). The loss per answer token is the clipped surrogate ``-min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` plus
``grpo_beta`` times the k3 estimate of the KL to the reference (:func:`engine.train.losses.grpo_token_losses`;
Shao et al. 2024), reduced per answer, per token, or over answers x grpo_max_new_tokens (Dr. GRPO, Liu et al.
2025). The reference is the model training started from: the bare base (adapters off), or the starting adapter's
frozen copy (``init_adapter``), as for DPO.

The data are SFT conversations: the prompt is every turn before the last assistant turn, which is the reference
answer. The rewards get the prompt's last user turn as ``prompts``, the reference answer as the column ``answer``
(:data:`ANSWER_COLUMN`) and the row's other plain columns by their names (``Conversation.columns``; a column of the
data named ``answer`` is the one they get). An evaluation scores the model's greedy answer to each held-out
prompt with the same rewards (``eval_reward``, ``eval_reward/<name>``, in the eval event's metrics) beside the eval
loss (the reference answers' cross-entropy); with early stopping the best evaluation is the highest eval reward.

Log-probs are the policy's own (temperature 1): ``grpo_temperature`` shapes only what is sampled. Each step's
figures (``Step.metrics``): ``reward`` (the mean weighted total), ``reward_std`` (the mean over prompts of their
group's standard deviation: 0 means no group had anything to learn from), ``reward/<name>`` (each function's
mean), ``kl`` and ``clip_fraction`` (per answer token), ``completion_length`` (answer tokens per answer); and a
``rollouts`` event (``core.protocol.rollouts``) with every answer sampled that step.

The answers of a step are trained on for ``grpo_updates_per_batch`` (mu) optimizer steps, ``rho`` measured against
the log-probs of the policy that sampled them (with mu = 1, ``rho`` is 1 and its gradient the plain policy
gradient). The sampling draws from a ``torch.Generator`` of its own, seeded from the run's seed (and the process's
rank); its state, the answers kept for later steps and how many steps they have left go into every checkpoint
(:data:`STATE_FILE`), so a resumed run samples and trains exactly as the uninterrupted one. On several processes
each samples for its share of the prompts; only the first process writes its state into a checkpoint (the seam
calls ``save_state`` there), so the others resume with fresh generators: not the same answers. FSDP, which gathers
the sharded weights in every forward and so needs every process to run the same forwards, is refused: the decode
loop stops when a process's own answers have ended.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.protocol.message import Event
from finetune_studio.core.protocol.rollouts import Rollouts
from finetune_studio.engine.datasets.bound import char_budget, cut_example
from finetune_studio.engine.datasets.render import IGNORE, Tokenized, prompt_and_completion_ids
from finetune_studio.engine.datasets.schema import Conversation
from finetune_studio.engine.decoding.decode import decode_batch
from finetune_studio.engine.decoding.token_sampling import Sampler
from finetune_studio.engine.train import init_adapter
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.losses import group_advantages, grpo_loss, grpo_token_losses
from finetune_studio.engine.train.objectives.base import Objective, Progress, TrainedModel

ANSWER_COLUMN = "answer"  # the column the rewards read the reference answer from (exact_match, token_f1)
STATE_FILE = "grpo_state-rank{rank}.pt"  # in a checkpoint: the sampler's generator, the kept answers, steps left


@dataclass(frozen=True)
class PromptExample(Tokenized):
    """An SFT conversation as GRPO reads it: the prompt's tokens (``input_ids[:prompt_tokens]``, ending with the
    generation prompt) then the reference answer's (its labels: the held-out loss), and the texts the rewards get."""

    prompt_tokens: int = 0
    prompt: str = ""  # the prompt's last user turn: the rewards' ``prompts``
    answer: str = ""  # the reference answer (the last assistant turn): the column ``answer``
    columns: tuple[tuple[str, Any], ...] = ()  # the row's plain columns (``Conversation.columns``)


@dataclass(frozen=True)
class Sampling:
    """How an objective samples its answers: how many to each prompt, how long at most, at what temperature."""

    answers_per_prompt: int
    max_new_tokens: int
    temperature: float


@dataclass(frozen=True)
class Answered:
    """A micro-batch's sampled answers, scored: what every sampling objective makes of them (:meth:`GRPO.answer`).
    Answer ``i`` answers prompt ``i // per_prompt``."""

    prompt_texts: list[str]  # each answer's prompt (its last user turn), as the rewards got it
    texts: list[str]  # the answers' text
    scores: Any  # core.rewards' scores: the weighted ``total`` and each function's (``by_function``)
    total: torch.Tensor  # [answers] float32 weighted total reward
    lengths: list[int]  # each answer's tokens
    laid: Batch  # prompt + answer of each, laid out as the run trains (on the CPU), labels on the answers
    per_prompt: int

    def stats(self) -> dict[str, float]:
        """Sums of the step's reward figures over these answers."""
        return {
            "answers": float(len(self.texts)),
            "reward": float(self.total.sum()),
            "length": float(sum(self.lengths)),
            **{f"reward/{name}": float(sum(s)) for name, s in self.scores.by_function.items()},
        }

    def items(self, advantages: Sequence[float], first_group: int) -> list[dict[str, Any]]:
        """The answers as a ``Rollouts`` event's items, with what the update made of each (``advantages``), the
        prompts' groups numbered from ``first_group``."""
        return [
            {
                "prompt": self.prompt_texts[i],
                "completion": self.texts[i],
                "reward": self.scores.total[i],
                "rewards": {name: s[i] for name, s in self.scores.by_function.items()},
                "advantage": float(advantages[i]),
                "group": first_group + i // self.per_prompt,
            }
            for i in range(len(self.texts))
        ]


@dataclass
class RolloutBatch(Batch):
    """Sampled answers after their prompts, labels on the answers, with what the loss needs of each."""

    advantages: torch.Tensor | None = None  # [answers] float32
    old_logps: torch.Tensor | None = None  # [answer tokens] the sampling policy's (None: mu = 1, the policy's own)
    ref_logps: torch.Tensor | None = None  # [answer tokens] the reference's (None: grpo_beta 0)
    stats: dict[str, float] = field(default_factory=dict)  # this batch's sums of the step's reward figures

    def to(self, device: str) -> RolloutBatch:
        """Every tensor field (a subclass's too) on ``device``; the numbers and the stats as they are."""
        moved: dict[str, Any] = {
            f.name: value.to(device) if isinstance(value := getattr(self, f.name), torch.Tensor) else value
            for f in fields(self)
        }
        return type(self)(**moved)

    def state(self) -> dict[str, Any]:
        """Tensors and numbers only (a checkpoint is read with ``weights_only``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["indices"], out["stats"] = list(self.indices), dict(self.stats)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RolloutBatch:
        return cls(**{**state, "indices": tuple(state["indices"])})


class GRPO(Objective):
    """GRPO on the recipe's seam: its own micro-batches (sampled answers), its state in checkpoints, its rollouts
    as events (see the module)."""

    name = "grpo"
    data_kinds = ("sft",)
    needs_reference = True  # started from an adapter: its frozen copy is the KL's reference
    rollout_type: type[RolloutBatch] = RolloutBatch  # what :meth:`sample` makes (and a checkpoint restores)

    @classmethod
    def sampling(cls, config: TrainConfig) -> Sampling:
        """How this objective samples: GRPO's ``grpo_*`` settings (an objective built on it reads its own)."""
        return Sampling(config.grpo_group_size, config.grpo_max_new_tokens, config.grpo_temperature)

    def updates_per_batch(self) -> int:
        """Optimizer steps taken on each batch of sampled answers (mu)."""
        return self.trained.config.grpo_updates_per_batch

    def __init__(self, trained: TrainedModel) -> None:
        super().__init__(trained)
        cfg = trained.config
        if cfg.parallelism == "fsdp" and _world_size() > 1:
            raise ConfigError(
                "parallelism",
                "GRPO samples answers with each process's own decode loop, which FSDP's sharded weights cannot run: "
                "choose ddp",
            )
        specs = getattr(cfg, "rewards", None)
        if not specs:
            raise ConfigError(
                "rewards", "GRPO scores its answers with rewards: list at least one, e.g. [{'kind': 'json_valid'}]"
            )
        from finetune_studio.core.rewards import RewardSet, parse_rewards

        tokenizer = trained.tokenizer
        count = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) if tokenizer else None
        self.rewards = RewardSet(parse_rewards(specs), self._learned, count_tokens=count)
        weakref.finalize(self, self.rewards.close)  # the sandboxed reward workers end with the run
        self.generator = torch.Generator().manual_seed(cfg.seed + 7919 * _rank())
        self.stop_ids = _stop_ids(trained.model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)
        self.examples: Sequence[Any] = ()
        self.kept: list[RolloutBatch] = []  # the answers trained on until uses_left runs out
        self.uses_left = 0
        self.pending: list[dict[str, Any]] | None = None  # the items of the next Rollouts event
        self.eval_examples: Sequence[Any] = ()  # the held-out prompts (prepare_eval)

    # --- data -----------------------------------------------------------------
    @classmethod
    def tokenize(cls, tokenizer: Any, example: Any, config: TrainConfig) -> Any:
        """The prompt (cut from the front so that ``grpo_max_new_tokens`` fit in ``max_length``) and the reference
        answer, as a :class:`PromptExample`; a conversation with no assistant turn has no answer (dropped)."""
        if not isinstance(example, Conversation):
            return super().tokenize(tokenizer, example, config)
        msgs = example.messages
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=-1)
        if last < 0:
            return Tokenized([], [])
        bounded, _ = cut_example(example, char_budget(config.max_length))  # bounded work whatever the row's size
        cut = bounded.messages
        prompt_ids, answer_ids = prompt_and_completion_ids(tokenizer, cut[:last], cut[last : last + 1], bounded.tools)
        room = config.max_length - cls.sampling(config).max_new_tokens
        kept = prompt_ids[-room:]
        answer = answer_ids[: config.max_length - len(kept)]
        user = next((m.content for m in reversed(msgs[:last]) if m.role == "user"), "")
        return PromptExample(
            input_ids=kept + answer,
            labels=[IGNORE] * len(kept) + answer,
            truncated=len(kept) < len(prompt_ids) or len(answer) < len(answer_ids),
            prompt_tokens=len(kept),
            prompt=user,
            answer=msgs[last].content,
            columns=example.columns,
        )

    def prepare(self, examples: Sequence, batch: Callable[[list[int]], Batch], progress: Progress) -> None:
        """Keep the training prompts; a reward that reads a column the data lacks is a ConfigError now."""
        from finetune_studio.core.rewards import parse_rewards

        self.examples = examples
        names = {ANSWER_COLUMN} | {name for ex in examples for name, _ in getattr(ex, "columns", ())}
        parse_rewards(self.trained.config.rewards, names)

    # --- the step's batches: sampled answers ------------------------------------
    def step_batches(
        self, next_groups: Callable[[], list[list[int]]], batch: Callable[[list[int]], Batch]
    ) -> list[Batch]:
        """Sample and score answers for the next prompts when the kept ones are spent (every mu steps)."""
        if self.uses_left == 0:
            self.kept, self.pending = self.sample_step(next_groups())
            self.uses_left = self.updates_per_batch()
        self.uses_left -= 1
        return list(self.kept)

    def sample_step(self, groups: list[list[int]]) -> tuple[list[RolloutBatch], list[dict[str, Any]]]:
        """The step's micro-batches of sampled answers (one per list of prompt indices) and their rollout items."""
        kept, items = [], list[dict[str, Any]]()
        per_prompt = self.sampling(self.trained.config).answers_per_prompt
        for group in groups:
            sampled, sampled_items = self.sample(group, first_group=len(items) // per_prompt)
            kept.append(sampled)
            items += sampled_items
        return kept, items

    def sample(self, indices: list[int], first_group: int = 0) -> tuple[RolloutBatch, list[dict[str, Any]]]:
        """G answers to each prompt of ``indices``, scored, as one batch (on the CPU) with their advantages and the
        sampling policy's and reference's log-probs; and the rollout items (their groups numbered from
        ``first_group``)."""
        cfg = self.trained.config
        g = cfg.grpo_group_size
        answered = self.answer(indices)
        total, laid = answered.total, answered.laid
        advantages = group_advantages(total, g, scale=cfg.grpo_loss != "dr_grpo")
        on_device = laid.to(self.trained.device)
        old = self.policy_logps(on_device) if cfg.grpo_updates_per_batch > 1 else None
        ref = self.reference_logps(on_device) if cfg.grpo_beta > 0 else None
        stats = {
            **answered.stats(),
            "groups": float(len(indices)),
            "reward_std": float(total.view(-1, g).std(dim=1).sum()),
        }
        rollout = RolloutBatch(
            laid.input_ids,
            laid.attention_mask,
            laid.labels,
            indices=laid.indices,
            position_ids=laid.position_ids,
            advantages=advantages,
            old_logps=old,
            ref_logps=ref,
            stats=stats,
        )
        return rollout, answered.items(advantages.tolist(), first_group)

    def answer(self, indices: list[int]) -> Answered:
        """The sampled answers to each prompt of ``indices`` (``sampling().answers_per_prompt`` each, in order),
        scored by the rewards and laid out as one batch on the CPU."""
        cfg, tokenizer = self.trained.config, self.trained.tokenizer
        g = self.sampling(cfg).answers_per_prompt
        examples = [self.examples[i] for i in indices]
        prompts = [list(ex.input_ids[: ex.prompt_tokens]) for ex in examples]
        answers = self.decode(prompts)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for per_prompt in answers for ids in per_prompt]
        prompt_texts = [ex.prompt for ex in examples for _ in range(g)]
        columns = {ANSWER_COLUMN: [ex.answer for ex in examples for _ in range(g)]}
        for name in dict.fromkeys(name for ex in examples for name, _ in ex.columns):  # each once, in order
            columns[name] = [dict(ex.columns).get(name) for ex in examples for _ in range(g)]
        scores = self.rewards.score(prompt_texts, texts, columns)
        items = [
            Tokenized(list(prompt) + ids, [IGNORE] * len(prompt) + ids)
            for prompt, per_prompt in zip(prompts, answers, strict=True)
            for ids in per_prompt
        ]
        laid = self.trained.layout(items) if self.trained.layout is not None else None
        if laid is None:
            raise RuntimeError(f"{type(self).__name__} needs the run's batch layout (TrainedModel.layout)")
        lengths = [len(ids) for per_prompt in answers for ids in per_prompt]
        return Answered(prompt_texts, texts, scores, torch.tensor(scores.total, dtype=torch.float32), lengths, laid, g)

    def decode(
        self, prompts: list[list[int]], group: int | None = None, sampler: Sampler | None = None
    ) -> list[list[list[int]]]:
        """``group`` (default G) sampled answers (token ids, ending with an end-of-turn token unless cut at
        grpo_max_new_tokens) to each prompt: the decode loop with the adapters live, the model in eval mode;
        ``sampler`` defaults to grpo_temperature's (:meth:`sampling`'s, for an objective built on GRPO)."""
        cfg, model = self.trained.config, self.trained.model
        how = self.sampling(cfg)
        g, n = group or how.answers_per_prompt, len(prompts)
        out: list[list[list[int]]] = [[[] for _ in range(g)] for _ in prompts]
        ended = [[False] * g for _ in prompts]
        stops = set(self.stop_ids)

        def collector(p: int) -> Callable[[list[int]], list[bool]]:
            def on_tokens(tokens: list[int]) -> list[bool]:
                for c, token in enumerate(tokens):
                    if not ended[p][c]:
                        out[p][c].append(token)
                        ended[p][c] = token in stops
                return list(ended[p])

            return on_tokens

        seeds = torch.randint(0, 2**62, (n,), generator=self.generator).tolist()
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        training = model.training
        model.eval()
        try:
            with self.trained.autocast():
                decode_batch(
                    causal_lm,
                    prompts,
                    [g] * n,
                    [how.max_new_tokens] * n,
                    sampler or Sampler(temperature=how.temperature),
                    [collector(p) for p in range(n)],
                    seeds,
                    pad_id=self.pad_id,
                )
        finally:
            model.train(training)
        return out

    def policy_logps(self, batch: Batch) -> torch.Tensor:
        """The answer tokens' log-probs under the policy as it is (no gradient, eval mode): pi_old for mu > 1."""
        model = self.trained.model
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.trained.autocast():
                return self.trained.logps(batch).logps.float().cpu()
        finally:
            model.train(training)

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """The answer tokens' log-probs under the reference: the starting adapter's frozen copy, or the bare base."""
        model = self.trained.model
        training = model.training
        model.eval()
        reference = init_adapter.reference_adapter(model) if self.trained.start else model.disable_adapter()
        try:
            with torch.no_grad(), reference, self.trained.autocast():
                return self.trained.logps(batch).logps.float().cpu()
        finally:
            model.train(training)

    # --- the loss ---------------------------------------------------------------
    def denominator(self, batch: Batch) -> int:
        cfg = self.trained.config
        if cfg.grpo_loss == "sequence":
            return batch.sequences
        if cfg.grpo_loss == "token":
            return batch.trained_tokens
        return batch.sequences * cfg.grpo_max_new_tokens

    def loss(self, batch: Batch, denom: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(batch, RolloutBatch) or batch.advantages is None:
            raise TypeError("GRPO trains on the batches it samples (step_batches)")
        cfg = self.trained.config
        out = self.trained.logps(batch)
        old = batch.old_logps if batch.old_logps is not None else out.logps.detach()
        losses, kl, clipped = grpo_token_losses(
            out.logps,
            old,
            batch.ref_logps if cfg.grpo_beta > 0 else None,
            batch.advantages[out.rows],
            epsilon=cfg.grpo_epsilon,
            beta=cfg.grpo_beta,
        )
        loss = grpo_loss(losses, out.rows, out.batch, cfg.grpo_loss, denom)
        sums = {"kl": kl.sum().item(), "tokens": float(kl.numel()), "clipped": clipped.float().sum().item()}
        return loss, {**sums, **batch.stats}

    def step_metrics(self, sums: dict[str, float], denom: int) -> dict[str, float]:
        answers, tokens = max(sums.get("answers", 0.0), 1.0), max(sums.get("tokens", 0.0), 1.0)
        out = {
            "reward": sums.get("reward", 0.0) / answers,
            "reward_std": sums.get("reward_std", 0.0) / max(sums.get("groups", 0.0), 1.0),
            "kl": sums.get("kl", 0.0) / tokens,
            "completion_length": sums.get("length", 0.0) / answers,
            "clip_fraction": sums.get("clipped", 0.0) / tokens,
        }
        out.update({k: v / answers for k, v in sums.items() if k.startswith("reward/")})
        return out

    def step_events(self, step: int) -> list[Event]:
        """The answers sampled for this step, once (a step that reuses earlier answers samples none)."""
        items, self.pending = self.pending, None
        return [Rollouts(step=step, items=items)] if items else []

    # --- evaluation: the reference answers' cross-entropy and the greedy answers' rewards ----
    best_metric = "eval_reward"  # the best evaluation (early stopping's best/) is the highest held-out reward

    def prepare_eval(self, examples: Sequence) -> None:
        self.eval_examples = examples

    def eval_sums(self, batch: Batch) -> dict[str, float]:
        """The reference answers' cross-entropy (the eval loss), and the model's greedy answer to each held-out
        prompt scored by the rewards: what the run is trained to raise, so the best evaluation is chosen by it."""
        out = self.trained.logps(batch)
        sums = {"loss": -out.logps.sum().item(), "count": float(out.logps.numel())}
        examples = [self.eval_examples[i] for i in batch.indices] if self.eval_examples else []
        if not examples:
            return sums
        prompts = [list(ex.input_ids[: ex.prompt_tokens]) for ex in examples]
        answers = self.decode(prompts, group=1, sampler=Sampler(temperature=0.0))
        tokenizer = self.trained.tokenizer
        texts = [tokenizer.decode(per_prompt[0], skip_special_tokens=True) for per_prompt in answers]
        columns: dict[str, list[Any]] = {ANSWER_COLUMN: [ex.answer for ex in examples]}
        for name in dict.fromkeys(name for ex in examples for name, _ in ex.columns):
            columns[name] = [dict(ex.columns).get(name) for ex in examples]
        scores = self.rewards.score([ex.prompt for ex in examples], texts, columns)
        sums["answers"] = float(len(texts))
        sums["reward"] = float(sum(scores.total))
        sums.update({f"reward/{name}": float(sum(v)) for name, v in scores.by_function.items()})
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``eval_reward``: the greedy answers' mean weighted reward; ``eval_reward/<name>``: each function's."""
        answers = sums.get("answers", 0.0)
        if not answers:
            return {}
        out = {"eval_reward": sums["reward"] / answers}
        out.update({f"eval_{k}": v / answers for k, v in sums.items() if k.startswith("reward/")})
        return out

    # --- checkpoints -------------------------------------------------------------
    def save_state(self, folder: Path, *, final: bool) -> None:
        """A checkpoint gets the sampling generator's state and the answers still to be trained on."""
        if final:
            return
        state = {
            "generator": self.generator.get_state(),
            "uses_left": self.uses_left,
            "kept": [b.state() for b in self.kept] if self.uses_left else [],
        }
        torch.save(state, Path(folder) / STATE_FILE.format(rank=_rank()))

    def load_state(self, folder: Path) -> None:
        path = Path(folder) / STATE_FILE.format(rank=_rank())
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.generator.set_state(state["generator"])
        self.uses_left = int(state["uses_left"])
        self.kept = [self.rollout_type.from_state(b) for b in state["kept"]]

    # --- a learned reward --------------------------------------------------------
    def _learned(self, spec: Any) -> Callable[..., list[float]]:
        """A ``reward_model`` reward: the reward model in ``adapter`` (its folder, or a reward run's id) scoring
        each answer on this run's device."""
        from finetune_studio.engine.reward_model import RewardModel

        model = RewardModel.load(_reward_model_folder(str(spec.params["adapter"])), device=self.trained.device)

        def score(prompts: list[str], completions: list[str], **_columns: Any) -> list[float]:
            return model.score(prompts, completions)

        return score


def _reward_model_folder(ref: str) -> Path:
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return folder
    from finetune_studio.core.store import Store

    store = Store()
    try:
        run = store.find_run(ref)
    finally:
        store.close()
    if run is None:
        raise ConfigError("rewards", f"no reward-model folder or run named {ref!r}: give a reward run's id or folder")
    return Path(run.run_dir) / "adapter"


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the model's generation config's end tokens and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
