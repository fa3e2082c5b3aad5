"""The Annotate tab's state, Qt-free: which pair is shown, the strength waiting for the next pick, the edit or
ranking box that is open, and what a key does.

Keys are one enum (:class:`Key`); the page maps key presses to it and calls :meth:`AnnotateState.press`. Decisions go
through :class:`~studio.state.annotation.Labeller` (the store, at once). Subscribers hear these topics: 'session' (a
session was opened or the annotator changed), 'item' (the pair shown, or a decision on it), 'strength', 'editing'
(an edit or ranking box opened or closed), 'message' (something to tell the person: :attr:`message`), 'queue' (the
order, the scorer or the predicted rewards changed).

The queue: the pairs in the order chosen (:mod:`core.label_queue`: as added, random, least sure first, largest
predicted gap first); the keys that move and the move after a decision follow it. The predicted rewards come from a
scorer the page runs off the UI thread and hands in with :meth:`AnnotateState.add_rewards` (or :meth:`score_with`
for a plain function). No anchoring: nothing the state offers for display says what the model predicts for a pair
before the person has decided it (:meth:`AnnotateState.revealed_prediction` is '' until then; the agreement figure
counts decisions already made).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from finetune_studio.core import label_queue as lq
from finetune_studio.core.preferences import PreferenceError, PreferenceStore
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.observable import Observable


class Key(enum.Enum):
    """What a key on the label view means."""

    LEFT = "left"  # A: the left answer is better
    RIGHT = "right"  # B: the right answer is better
    TIE = "tie"  # T
    BOTH_BAD = "both_bad"  # X
    SKIP = "skip"  # S
    EDIT_LEFT = "edit_left"  # E: rewrite the left answer (the rewrite is chosen)
    EDIT_RIGHT = "edit_right"  # Shift+E
    RANK = "rank"  # R: order every answer to the prompt (3 or more)
    STRENGTH_1 = "strength_1"  # 1-3: how much better, for the next A / B
    STRENGTH_2 = "strength_2"
    STRENGTH_3 = "strength_3"
    UNDO = "undo"  # Ctrl+Z
    NEXT = "next"  # Right, Down, J
    PREVIOUS = "previous"  # Left, Up, K
    MARKDOWN = "markdown"  # M: the view's business (how answers are shown), not the state's
    DIFF = "diff"  # D

    @property
    def choice(self) -> str:
        """The labeller's choice for a deciding key ('' for the others)."""
        return self.value if self in DECIDING else ""


DECIDING = (Key.LEFT, Key.RIGHT, Key.TIE, Key.BOTH_BAD, Key.SKIP)
STRENGTH_KEYS = {Key.STRENGTH_1: 1, Key.STRENGTH_2: 2, Key.STRENGTH_3: 3}
SAID = {
    "left": "A (left) is better",
    "right": "B (right) is better",
    "tie": "Tie",
    "both_bad": "Both bad",
    "skip": "Skipped",
    "edit": "Edited (the edit is chosen)",
}
RANK_PROMPT = "order, best first: "
RANDOM_SEED = 0  # the random order's shuffle (the same each time a session is opened)
Scores = Callable[[str, list[str]], list[float]]  # (prompt, answers) -> one reward per answer


@dataclass(frozen=True)
class ScoreJob:
    """One prompt's answers to score: ``candidates`` (store ids) and their ``texts``, in the same order."""

    prompt_id: str
    prompt: str
    candidates: tuple[str, ...]
    texts: tuple[str, ...]


class AnnotateState(Observable):
    """One session being labelled by one annotator."""

    def __init__(self) -> None:
        super().__init__()
        self.prefs: PreferenceStore | None = None
        self.spec: an.SessionSpec | None = None
        self.labeller: an.Labeller | None = None
        self.index = 0
        self.strength: int | None = None  # 1-3 for the next A / B
        self.editing = ""  # 'left' / 'right' while an edit is open, 'rank' while a ranking is
        self.advancing = True  # after a decision, move to the next pair still open
        self.message = ""
        self.predictions = an.Predictions("")
        self.queue: list[int] = []  # item indices in the order chosen

    # --- the session ----------------------------------------------------------------
    def use(self, prefs: PreferenceStore, spec: an.SessionSpec) -> None:
        """Label ``spec`` under its annotator, starting at its first open pair (in the session's queue order)."""
        self.prefs, self.spec = prefs, spec
        self.labeller = an.Labeller(prefs, spec)
        self.editing, self.strength = "", None
        self.predictions = an.Predictions.load(spec.name)
        self._requeue()
        self.index = self.first_open()
        self.notify("session")
        self.notify("queue")
        self.notify("item")

    def set_annotator(self, name: str) -> None:
        """The person labelling (typed at any time): the session is saved under that name and shows their labels."""
        name = name.strip()
        if self.spec is None or self.prefs is None:
            return
        if name != self.spec.annotator:
            self.spec.annotator = name
            self.spec.save()
        if self.labeller is None or name != self.labeller.annotator:
            self.labeller = an.Labeller(self.prefs, self.spec, annotator=name)
            self.index = self.first_open()
            self.notify("session")
            self.notify("item")
            self.say(f"Labelling as {name or 'no name'}.")

    def items_added(self) -> None:
        """The generator added pairs (the first one is shown as soon as it is there)."""
        self._requeue()
        self.notify("queue")
        self.notify("item")

    @property
    def items(self) -> list[an.Item]:
        return self.spec.items if self.spec is not None else []

    @property
    def item(self) -> an.Item | None:
        items = self.items
        return items[min(self.index, len(items) - 1)] if items else None

    def item_state(self) -> an.ItemState:
        item = self.item
        return self.labeller.state(item) if item is not None and self.labeller is not None else an.ItemState()

    def first_open(self) -> int:
        """The first pair of the queue still open (the queue's last when every pair is decided)."""
        assert self.labeller is not None or not self.items
        for i in self.queue:
            assert self.labeller is not None
            if not self.labeller.state(self.items[i]).decision:
                return i
        return self.queue[-1] if self.queue else 0

    @property
    def position(self) -> int:
        """Where the pair shown is in the queue (0-based)."""
        return self.queue.index(self.index) if self.index in self.queue else 0

    # --- the queue's order and the model's predictions ------------------------------
    @property
    def order(self) -> lq.Order:
        return self.predictions.order

    @property
    def scorer(self) -> an.Scorer | None:
        return self.predictions.scorer

    @property
    def rewards(self) -> dict[str, float]:
        """The chosen scorer's predicted reward of each answer scored so far (candidate id -> reward)."""
        return self.predictions.of(self.scorer)

    def _margin(self, item: an.Item) -> float | None:
        return lq.margin(self.rewards, item.a, item.b)

    def _requeue(self) -> None:
        items = self.items
        margins = [self._margin(i) for i in items]
        self.queue = lq.order(self.order, margins, [f"{i.a}|{i.b}" for i in items], seed=RANDOM_SEED)

    def set_order(self, how: str) -> None:
        """Order the queue ``how`` (:data:`core.label_queue.ORDERS`) and show its first open pair. An order by the
        model's predictions needs a scorer and its rewards: :meth:`to_score` lists what is missing."""
        order = lq.parse_order(how)
        if self.spec is None:
            return
        if order != self.order:
            self.predictions.order = order
            self.predictions.save()
        self._requeue()
        self.index = self.first_open()
        self.notify("queue")
        self.notify("item")
        if order in lq.NEEDS_SCORES and self.scorer is None:
            self.say("Choose a scorer (a reward model, or a DPO run's adapter) to order the pairs by its predictions.")

    def set_scorer(self, scorer: an.Scorer | None) -> None:
        """The scorer whose predictions order the queue (its rewards scored before are kept and used again)."""
        if self.spec is None or scorer == self.scorer:
            return
        self.predictions.scorer = scorer
        self.predictions.save()
        self._requeue()
        if self.order in lq.NEEDS_SCORES:
            self.index = self.first_open()
        self.notify("queue")
        self.notify("item")

    def to_score(self) -> list[ScoreJob]:
        """The prompts with answers the chosen scorer has no reward for yet (every answer of such a prompt)."""
        if self.scorer is None or self.prefs is None or self.labeller is None:
            return []
        have, jobs, seen = self.rewards, [], set()
        for item in self.items:
            if item.prompt_id in seen or (item.a in have and item.b in have):
                continue
            seen.add(item.prompt_id)
            ids = self.labeller.candidates_of(item)
            row = self.prefs.conn.execute("SELECT messages FROM prompts WHERE id = ?", (item.prompt_id,)).fetchone()
            turns = json.loads(row[0]) if row else []
            prompt = str(turns[-1]["content"]) if turns else ""
            texts = tuple(str(self.prefs.candidate(c)["text"]) for c in ids)
            jobs.append(ScoreJob(item.prompt_id, prompt, tuple(ids), texts))
        return jobs

    def add_rewards(self, scorer: an.Scorer, candidates: list[str] | tuple[str, ...], rewards: list[float]) -> None:
        """Predicted rewards arrived (from ``scorer``: those of a scorer no longer chosen are kept for it). The
        queue is ordered again; the pair on screen stays on screen."""
        if len(candidates) != len(rewards):
            raise ValueError(f"{len(rewards)} rewards for {len(candidates)} answers")
        if self.spec is None:
            return
        self.predictions.rewards.setdefault(scorer.key, {}).update(
            {c: float(r) for c, r in zip(candidates, rewards, strict=True)}
        )
        self.predictions.save()
        if scorer != self.scorer:
            return
        self._requeue()
        self.notify("queue")

    def score_with(self, scores: Scores) -> int:
        """Score every answer still missing a reward with ``scores`` (a plain function, here and now: for scripts
        and tests; the page runs its scorer off the UI thread). Returns how many prompts were scored."""
        scorer = self.scorer
        if scorer is None:
            raise ValueError("choose a scorer first")
        jobs = self.to_score()
        for job in jobs:
            self.add_rewards(scorer, job.candidates, list(scores(job.prompt, list(job.texts))))
        return len(jobs)

    def first_in_queue(self) -> None:
        """Show the first open pair of the queue (after the order changed under the person, e.g. scores came in)."""
        if self.items:
            self.index = self.first_open()
            self.notify("item")

    def agreement(self) -> lq.Agreement:
        """How often the chosen scorer agreed with this annotator's last picks (decisions already made only)."""
        if self.labeller is None:
            return lq.Agreement(0, 0)
        rewards = self.rewards
        return lq.agreement([(True, lq.margin(rewards, c, r)) for c, r in an.picks(self.labeller, self.items)])

    def revealed_prediction(self) -> str:
        """What the model predicted for the pair on screen, in screen terms, once the person has decided it; ''
        before (no anchoring) and when there is no prediction."""
        item = self.item
        if item is None or not self.item_state().decision:
            return ""
        m = lq.margin(self.rewards, item.left, item.right)
        if m is None:
            return ""
        if m == 0:
            return "The model had no preference on this pair."
        return f"The model preferred {'A (left)' if m > 0 else 'B (right)'} (predicted gap {abs(m):.2f})."

    def progress(self) -> an.Progress | None:
        if self.labeller is None or not self.items:
            return None
        return an.progress(self.labeller, self.items)

    @property
    def all_labelled(self) -> bool:
        p = self.progress()
        return p is not None and p.remaining == 0

    def say(self, text: str) -> None:
        self.message = text
        self.notify("message")

    # --- keys -----------------------------------------------------------------------
    def press(self, key: Key) -> None:
        """What a key does on the label view (nothing while an edit or ranking box is open: the box has the keys)."""
        if self.editing or key in (Key.MARKDOWN, Key.DIFF):
            return
        if key is Key.UNDO:
            self.undo()
        elif key is Key.NEXT:
            self.step(1)
        elif key is Key.PREVIOUS:
            self.step(-1)
        elif key in STRENGTH_KEYS:
            self.strength = STRENGTH_KEYS[key]
            self.notify("strength")
        elif self.item is None:
            return
        elif key in (Key.EDIT_LEFT, Key.EDIT_RIGHT):
            self.open_edit("left" if key is Key.EDIT_LEFT else "right")
        elif key is Key.RANK:
            self.open_rank()
        else:
            self.decide(key.choice)

    def decide(self, choice: str) -> None:
        item = self.item
        assert item is not None and self.labeller is not None
        strength = an.STRENGTHS[self.strength] if choice in ("left", "right") and self.strength else None
        try:
            self.labeller.decide(item, choice, strength)
        except PreferenceError as exc:
            self.say(str(exc))
            return
        self.strength = None
        self.notify("strength")
        self.advance()

    def go(self, index: int) -> None:
        """Show item ``index`` (its index in the session, not in the queue)."""
        if self.items:
            self.index = max(0, min(index, len(self.items) - 1))
            self.notify("item")

    def step(self, by: int) -> None:
        """The next (``by`` 1) or previous (-1) pair of the queue."""
        if self.queue:
            pos = max(0, min(self.position + by, len(self.queue) - 1))
            self.go(self.queue[pos])

    def advance(self) -> None:
        """To the next pair of the queue still open (after this one, wrapping around), or stay when every pair is
        labelled."""
        assert self.labeller is not None
        items, queue = self.items, self.queue
        if self.advancing and queue:
            pos = self.position
            for i in queue[pos + 1 :] + queue[: pos + 1]:
                if not self.labeller.state(items[i]).decision:
                    self.index = i
                    break
        self.notify("item")
        if self.all_labelled:
            self.say(f"All {an.plural(len(items), 'pair')} labelled.")

    def undo(self) -> None:
        if self.labeller is None or not self.labeller.can_undo:
            self.say("Nothing to undo.")
            return
        item = self.labeller.undo()
        if item in self.items:
            self.index = self.items.index(item)
        self.notify("item")
        self.say("Undone.")

    # --- edit and rank --------------------------------------------------------------
    def open_edit(self, side: str) -> str:
        """Open the edit of the ``side`` answer; returns its text (to edit)."""
        item = self.item
        assert item is not None and self.prefs is not None
        self.editing = side
        self.notify("editing")
        return self.prefs.candidate(item.left if side == "left" else item.right)["text"]

    def rank_candidates(self) -> list[str]:
        assert self.labeller is not None and self.item is not None
        return self.labeller.candidates_of(self.item)

    def open_rank(self) -> bool:
        ids = self.rank_candidates()
        if len(ids) < 3:
            self.say("Ranking needs 3 or more answers to a prompt: set Candidates to 2 or 3 pairs.")
            return False
        self.editing = "rank"
        self.notify("editing")
        return True

    def rank_text(self) -> str:
        """What the ranking box starts with: the answers, numbered, then where to type the order."""
        assert self.prefs is not None
        lines = [f"{i + 1}: {self.prefs.candidate(c)['text'][:100]!r}" for i, c in enumerate(self.rank_candidates())]
        return "\n".join(lines) + "\n\n" + RANK_PROMPT

    def save(self, text: str) -> bool:
        """Save the open edit (``text``: the rewritten answer) or ranking (``text``: the box, with the order typed
        after 'order, best first:'). False, with a message, when it cannot be saved; the box stays open."""
        item = self.item
        assert item is not None and self.labeller is not None
        try:
            if self.editing == "rank":
                ids = self.rank_candidates()
                tail = text.rsplit(RANK_PROMPT.strip(), 1)[-1]
                order = [int(d) - 1 for d in re.findall(r"\d+", tail)]
                if sorted(order) != list(range(len(ids))):
                    self.say(f"Give each number from 1 to {len(ids)} once, best first.")
                    return False
                self.labeller.rank(item, [ids[i] for i in order])
            elif self.editing in ("left", "right"):
                self.labeller.edit(item, self.editing, text)
            else:
                return False
        except PreferenceError as exc:
            self.say(str(exc))
            return False
        self.editing = ""
        self.notify("editing")
        self.advance()
        return True

    def cancel(self) -> None:
        if self.editing:
            self.editing = ""
            self.notify("editing")
            self.notify("item")
