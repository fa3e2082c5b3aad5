"""An online RL run's rollouts as the Train page shows them, and sending some of them to Annotate. Qt-free.

A rollout is one answer the policy sampled during training: its prompt, the completion, the total reward, each
reward function's score, its group-normalised advantage and its group (the G answers to one prompt at one step). They
come live as ``rollouts`` events and, for a finished or reopened run, from the database (``Store.rollouts``);
:class:`Rollouts` keeps them in arrival order and gives sorted views of the latest step or of every step.

:func:`send_to_annotate` puts chosen rollouts (answers to one prompt) into the preference store as candidates to
label (their run and step recorded) and into a labelling session of their own, ``rollouts of <run>``, whose items
are pairs of them: the Annotate tab opens that session and a person's decisions become pairs for the reward model
and DPO like any other.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_studio.core.preferences import PreferenceStore, transaction
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.observable import Observable

SCOPES = ("latest", "all")  # the latest step's rollouts, or every step's
# Sort keys beside each reward function's score ("reward/<name>").
SORT_KEYS = ("step", "group", "reward", "advantage", "length", "prompt")
CANDIDATE_SOURCE = "grpo-rollout"  # the candidates' source in the preference store


@dataclass(frozen=True)
class Rollout:
    """One sampled answer of a run: ``index`` is its place among its step's rollouts (with ``step``, its key)."""

    step: int
    index: int
    prompt: str
    completion: str
    reward: float
    rewards: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    group: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.index)

    @classmethod
    def of(cls, step: int, index: int, item: Mapping[str, Any] | object) -> Rollout:
        """A rollout from an event's item (a dict) or a stored row (a record with these fields, ``rewards`` a dict
        or its JSON text); missing figures read as NaN / 0."""

        def get(name: str, default: Any = None) -> Any:
            if isinstance(item, Mapping):
                return item.get(name, default)
            return getattr(item, name, default)

        rewards = get("rewards") or {}
        if isinstance(rewards, str):
            try:
                rewards = json.loads(rewards)
            except ValueError:
                rewards = {}
        if not isinstance(rewards, Mapping):
            rewards = {}
        place = get("index", get("position"))
        return cls(
            step=int(get("step") if get("step") is not None else step),
            index=int(place) if place is not None else index,
            prompt=str(get("prompt", "") or ""),
            completion=str(get("completion", "") or ""),
            reward=_float(get("reward")),
            rewards={str(k): _float(v) for k, v in dict(rewards).items()},
            advantage=_float(get("advantage"), 0.0),
            group=int(get("group", 0) or 0),
        )

    def sort_value(self, key: str) -> float | str:
        """The figure a column shows and sorts by (the prompt's text for 'prompt')."""
        return self.prompt if key == "prompt" else _number_of(key)(self)


class Rollouts(Observable):
    """Every rollout of the run shown so far, oldest first. Topic: 'rollouts' after each change."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Rollout] = []
        self._keys: set[tuple[int, int]] = set()
        self.functions: list[str] = []  # reward functions' names, in the order they came
        self.generation = 0  # counts the times rows were taken away (a resume, a new run): views built before are stale

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def last_step(self) -> int:
        return self.rows[-1].step if self.rows else -1

    def add(self, step: int, items: Sequence[Mapping[str, Any]]) -> None:
        """One ``rollouts`` event: the items of ``step`` (a step seen again replaces that step and the later ones,
        as a resumed run samples them again)."""
        self.extend(Rollout.of(step, i, item) for i, item in enumerate(items))

    def extend(self, rollouts: Iterable[Rollout]) -> None:
        new = list(rollouts)
        if not new:
            return
        first = min(r.step for r in new)
        if self.rows and first <= self.last_step:
            self._drop_after(first - 1)
        for r in new:
            if r.key in self._keys:
                continue
            self._keys.add(r.key)
            self.rows.append(r)
            for name in r.rewards:
                if name not in self.functions:
                    self.functions.append(name)
        self.notify("rollouts")

    def truncate_after(self, step: int) -> None:
        if self.rows and self.last_step > step:
            self._drop_after(step)
            self.notify("rollouts")

    def _drop_after(self, step: int) -> None:
        self.generation += 1
        self.rows = [r for r in self.rows if r.step <= step]
        self._keys = {r.key for r in self.rows}

    def clear(self) -> None:
        self.generation += 1
        self.rows, self._keys, self.functions = [], set(), []
        self.notify("rollouts")

    def view(
        self, scope: str = "latest", sort: str = "reward", descending: bool = True, step: int | None = None
    ) -> list[Rollout]:
        """The rollouts of the latest step (``scope`` 'latest'; ``step``: of that step instead) or of all steps
        ('all'), sorted by ``sort`` (one of :data:`SORT_KEYS` or ``reward/<name>``); ties, and NaN scores (last),
        keep the order they came in."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if scope == "latest":
            shown = self.last_step if step is None else step
            rows = [r for r in self.rows if r.step == shown]
        else:
            rows = self.rows
        if sort == "prompt":
            return sorted(rows, key=lambda r: r.prompt, reverse=descending)
        get = _number_of(sort)
        keyed = [(get(r), r) for r in rows]
        scored = [kr for kr in keyed if not math.isnan(kr[0])]
        scored.sort(key=lambda kr: kr[0], reverse=descending)  # stable: equal scores keep their order
        return [r for _, r in scored] + [r for v, r in keyed if math.isnan(v)]

    def sorted_view(self) -> SortedView:
        return SortedView(self)

    def group_of(self, rollout: Rollout) -> list[Rollout]:
        """The answers sampled with ``rollout`` for its prompt (same step and group), itself included."""
        return [r for r in self.rows if r.step == rollout.step and r.group == rollout.group]


class SortedView:
    """:meth:`Rollouts.view` kept up to date as rollouts come: while only rows are added, every step's view
    inserts the new rows into the sorted list (a binary search each) instead of sorting every rollout again, so the
    table of a long run's 30,000 rollouts follows each step without a pause."""

    def __init__(self, rollouts: Rollouts, scope: str = "latest", sort: str = "reward", descending: bool = True):
        self.rollouts = rollouts
        self.scope, self.sort, self.descending = scope, sort, descending
        self.step: int | None = None  # the latest-step view held on this step
        self.rows: list[Rollout] = []
        self._built: tuple[object, ...] = ()  # what rows were built for: (generation, scope, sort, descending, step)
        self._seen = 0  # rollouts' rows already in the view

    def update(self) -> list[Rollout]:
        src = self.rollouts
        wanted = (src.generation, self.scope, self.sort, self.descending, self.step)
        shown = src.last_step if self.step is None else self.step
        new = len(src.rows) - self._seen
        # a step's few rows are inserted; many at once (a run's history) are sorted with the others in one go
        grows = self._built == wanted and self.sort != "prompt" and 0 <= new <= max(64, len(self.rows) // 16)
        if grows and self.scope == "latest" and self.rows and self.rows[0].step != shown:
            grows = False  # a newer step replaces the latest step's rows
        if grows:
            get = _number_of(self.sort)
            sign = -1.0 if self.descending else 1.0

            def key(r: Rollout) -> tuple[bool, float]:
                v = get(r)
                return (math.isnan(v), 0.0 if math.isnan(v) else sign * v)

            for r in src.rows[self._seen :]:
                if self.scope == "all" or r.step == shown:
                    bisect.insort_right(self.rows, r, key=key)
        else:
            self.rows = src.view(self.scope, self.sort, self.descending, step=self.step)
        self._built, self._seen = wanted, len(src.rows)
        return self.rows


# --- Send to Annotate ---------------------------------------------------------------------------------------------
class SendError(ValueError):
    """The chosen rollouts cannot be labelled as they are; the message says what to choose instead."""


@dataclass(frozen=True)
class Sent:
    session: str  # the labelling session that holds them
    candidates: int  # answers put in the store (new or already there)
    items: int  # pairs added to the session (0: it had them all already)
    partner: Rollout | None = None  # the answer a single chosen rollout is paired with

    @property
    def message(self) -> str:
        paired = ""
        if self.partner is not None:
            paired = f" (paired with its group's answer of reward {self.partner.reward:.3g})"
        if not self.items:
            return f"Already in Annotate: session {self.session!r} has these answers{paired}."
        return (
            f"Sent {an.plural(self.candidates, 'answer')} to Annotate{paired}: "
            f"{an.plural(self.items, 'pair')} to label in session {self.session!r}."
        )


def session_name(run_name: str, run_id: str) -> str:
    """The labelling session of a run's rollouts: ``rollouts of <run name>`` (no slashes in a session's name)."""
    name = (run_name or run_id).replace("/", "-").replace("\\", "-").strip().lstrip(".") or run_id
    return f"rollouts of {name}"


def choose_partner(chosen: Rollout, group: Sequence[Rollout]) -> Rollout | None:
    """For one chosen rollout: the answer of its group (a different text) whose reward is furthest from its own, so
    the pair shows the person what the reward separates most."""
    others = [r for r in group if r.completion.strip() != chosen.completion.strip()]
    if not others:
        return None

    def distance(r: Rollout) -> float:
        gap = abs(r.reward - chosen.reward)
        return -1.0 if math.isnan(gap) else gap

    return max(others, key=distance)


def send_to_annotate(
    prefs: PreferenceStore,
    chosen: Sequence[Rollout],
    *,
    run_id: str,
    run_name: str = "",
    model: str = "default",
    group: Sequence[Rollout] = (),
    sampling: Mapping[str, Any] | None = None,
) -> Sent:
    """Put ``chosen`` (answers to one prompt) into the store as candidates of ``run_id`` at their step, and into the
    run's labelling session as pairs to label: neighbours in reward order, so the answers the reward tells apart
    least come first in each pair. A single chosen rollout is paired with an answer of its ``group`` (see
    :func:`choose_partner`). ``sampling``: how the run sampled them (its temperature), kept with each candidate.
    Raises :class:`SendError` with what to choose instead."""
    if not chosen:
        raise SendError("Select one or more rollouts first (click a row; Ctrl+click or Shift+click for more).")
    prompts = {r.prompt.strip() for r in chosen}
    if len(prompts) > 1:
        raise SendError(
            f"The selected rollouts answer {len(prompts)} different prompts: select answers to one prompt "
            "(sort by Prompt to bring them together)."
        )
    prompt = prompts.pop()
    if not prompt:
        raise SendError("The selected rollouts have no prompt text to label them against.")
    distinct = list({r.completion.strip(): r for r in sorted(chosen, key=lambda r: r.key)}.values())
    partner = None
    if len(distinct) == 1:
        partner = choose_partner(distinct[0], group)
        if partner is None:
            raise SendError(
                "Labelling compares two different answers: select a second answer to this prompt "
                "(its group's answers are all the same)."
            )
        distinct.append(partner)
    distinct.sort(key=lambda r: -r.reward if not math.isnan(r.reward) else math.inf)
    name = session_name(run_name, run_id)
    spec = _session(name)
    if spec is not None and spec.side_a.adapter != run_id:  # another run of the same name has that session
        name = f"{name} ({run_id})"
        spec = _session(name)
    if spec is None:
        spec = an.SessionSpec(
            name=name,
            prompts=[prompt],
            side_a=an.Side(model=model or "default", adapter=run_id, seed=0),
            side_b=an.Side(model=model or "default", adapter=run_id, seed=1),  # the same policy, another draw
            sampling=_session_sampling(sampling),
        )
    source = f"rollouts:{run_id}"
    with transaction(prefs.conn):
        prompt_id = prefs.add_prompt(prompt, source=source)
        ids = [
            prefs.add_candidate(
                prompt_id,
                r.completion.strip(),
                model=model,
                adapter=run_id,
                run_id=run_id,
                checkpoint=f"step-{r.step:06d}",
                sampling=dict(sampling or {}),
                source=CANDIDATE_SOURCE,
            )
            for r in distinct
        ]
    have = {frozenset((i.a, i.b)) for i in spec.items}
    added = 0
    for a, b in zip(ids, ids[1:], strict=False):
        if a != b and frozenset((a, b)) not in have:
            spec.items.append(an.Item(prompt_id=prompt_id, a=a, b=b))
            have.add(frozenset((a, b)))
            added += 1
    if prompt not in spec.prompts:
        spec.prompts.append(prompt)
    spec.save()
    return Sent(session=name, candidates=len(ids), items=added, partner=partner)


def _session_sampling(sampling: Mapping[str, Any] | None) -> an.Sampling:
    """The session's sampling: the run's temperature where it is known (more answers drawn alike)."""
    try:
        return an.Sampling(temperature=float((sampling or {})["temperature"]))
    except (KeyError, TypeError, ValueError):
        return an.Sampling()


def _session(name: str) -> an.SessionSpec | None:
    try:
        return an.SessionSpec.load(name)
    except ValueError:
        return None


def _number_of(key: str) -> Callable[[Rollout], float]:
    """How to read a rollout's figure ``key`` (one of :data:`SORT_KEYS` but prompt, or ``reward/<name>``)."""
    if key.startswith("reward/"):
        name = key[len("reward/") :]
        return lambda r: r.rewards.get(name, math.nan)
    if key == "length":
        return lambda r: float(len(r.completion))
    if key in ("step", "group", "reward", "advantage"):
        return lambda r: float(getattr(r, key))
    raise ValueError(f"cannot sort rollouts by {key!r}")


def _float(value: Any, default: float = math.nan) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out
