"""The Annotate tab's state, Qt-free: which pair is shown, the strength waiting for the next pick, the edit or
ranking box that is open, and what a key does.

Keys are one enum (:class:`Key`); the page maps key presses to it and calls :meth:`AnnotateState.press`. Decisions go
through :class:`~studio.state.annotation.Labeller` (the store, at once). Subscribers hear these topics: 'session' (a
session was opened or the annotator changed), 'item' (the pair shown, or a decision on it), 'strength', 'editing'
(an edit or ranking box opened or closed), 'message' (something to tell the person: :attr:`message`).
"""

from __future__ import annotations

import enum
import re

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

    # --- the session ----------------------------------------------------------------
    def use(self, prefs: PreferenceStore, spec: an.SessionSpec) -> None:
        """Label ``spec`` under its annotator, starting at its first open pair."""
        self.prefs, self.spec = prefs, spec
        self.labeller = an.Labeller(prefs, spec)
        self.editing, self.strength = "", None
        self.index = self.first_open()
        self.notify("session")
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
        for i, item in enumerate(self.items):
            assert self.labeller is not None
            if not self.labeller.state(item).decision:
                return i
        return max(0, len(self.items) - 1)

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
            self.go(self.index + 1)
        elif key is Key.PREVIOUS:
            self.go(self.index - 1)
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
        if self.items:
            self.index = max(0, min(index, len(self.items) - 1))
            self.notify("item")

    def advance(self) -> None:
        """To the next pair still open (after this one, wrapping around), or stay when every pair is labelled."""
        assert self.labeller is not None
        items = self.items
        if self.advancing:
            for i in list(range(self.index + 1, len(items))) + list(range(0, self.index + 1)):
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
