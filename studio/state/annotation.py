"""A labelling session: prompts, two sides that answer them, and the decisions a person makes, all in the store.

A session is a small JSON file (``<data dir>/annotation/<name>.json``, written atomically): its settings (the
prompts, side A and side B, the sampling settings, pairs per prompt) and its *items*, one per pair of candidates
(side A's i-th answer against side B's i-th answer to one prompt), added as soon as both answers are in the store.
Decisions never live in that file: each is a comparison of :mod:`core.preferences`, committed the moment it is
made, so an item's state is read back from SQLite and a session reopened after a crash continues where it stopped.

Which answer is shown on the left is drawn per item from a hash of the item (random across items, the same each
time the item is shown) and stored with the decision (``shown_left``), so position bias can be measured.

A model can help order the queue (:mod:`core.label_queue`): a :class:`Scorer` (a reward model, or a DPO adapter's
implicit reward) predicts a reward for each answer; the rewards are kept per scorer beside the session
(:class:`Predictions`, ``<data dir>/annotation/scores/<name>.json``), so a reopened session keeps its order and the
agreement figure (:func:`picks`: the person's picks of a side, oldest first) counts decisions made before.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_studio.core import paths
from finetune_studio.core.label_queue import Order, parse_order
from finetune_studio.core.preferences import Decision, PreferenceError, PreferenceStore, transaction
from finetune_studio.studio.state.run_labels import field as field_of

SESSION_VERSION = 1
STRENGTHS = {1: 1 / 3, 2: 2 / 3, 3: 1.0}  # the 1-3 keys as the store's 0-1 strength
# DPO from an SFT adapter: the README's loop found 2e-5 right, and SFT's higher rates harmful to the adapter.
DPO_LEARNING_RATE = 2e-5


def sessions_dir() -> Path:
    path = paths.data_dir() / "annotation"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Side:
    """Who answers: the base ``model`` alone (``adapter`` empty), or with an adapter (a run id or an adapter
    folder; ``checkpoint`` a step of that run), sampled with ``seed``."""

    model: str = "default"
    adapter: str = ""
    checkpoint: int | None = None
    seed: int = 0

    def label(self) -> str:
        who = "base" if not self.adapter else self.adapter + (f" step {self.checkpoint}" if self.checkpoint else "")
        return f"{who} (seed {self.seed})"

    @property
    def init_adapter(self) -> str:
        """This side's adapter as ``init_adapter`` of a training config ('' for the base)."""
        if not self.adapter:
            return ""
        return f"{self.adapter}:step-{self.checkpoint:06d}" if self.checkpoint is not None else self.adapter


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max new tokens must be at least 1")


@dataclass(frozen=True)
class Item:
    """One comparison to make: candidate ``a`` (side A) against ``b`` (side B) for ``prompt_id``."""

    prompt_id: str
    a: str
    b: str

    @property
    def left_is_a(self) -> bool:
        return hashlib.sha256(f"{self.a}|{self.b}".encode()).digest()[0] % 2 == 0

    @property
    def left(self) -> str:
        return self.a if self.left_is_a else self.b

    @property
    def right(self) -> str:
        return self.b if self.left_is_a else self.a


@dataclass(frozen=True)
class ItemState:
    """What was decided on an item: ``decision`` in screen terms ('left', 'right', 'tie', 'both_bad', 'skip',
    'edit') or '' when nothing yet."""

    decision: str = ""
    strength: float | None = None
    comparison_id: int | None = None
    edited_text: str = ""


@dataclass
class SessionSpec:
    name: str
    prompts: list[str]
    side_a: Side
    side_b: Side
    sampling: Sampling = field(default_factory=Sampling)
    pairs_per_prompt: int = 1  # 1 to 3: 2 to 6 candidates per prompt
    annotator: str = ""
    items: list[Item] = field(default_factory=list)
    version: int = SESSION_VERSION

    def __post_init__(self) -> None:
        self.name = self.name.strip()
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ValueError("give the session a name (letters, digits, spaces; no slashes)")
        self.prompts = [p for p in (p.strip() for p in self.prompts) if p]
        if not self.prompts:
            raise ValueError("the session has no prompts: type or paste some, one per line, or load a dataset")
        if not 1 <= self.pairs_per_prompt <= 3:
            raise ValueError("pairs per prompt must be 1, 2 or 3 (2 to 6 candidates per prompt)")
        if self.side_a.model != self.side_b.model:
            raise ValueError("both sides answer with one base model (an adapter or a seed makes them differ)")
        if self.side_a == self.side_b:
            raise ValueError("side A and side B are the same model, adapter and seed: change one (a seed will do)")

    @property
    def source(self) -> str:
        """The ``source`` of this session's comparisons in the store."""
        return f"annotate:{self.name}"

    @property
    def path(self) -> Path:
        return sessions_dir() / f"{self.name}.json"

    def save(self) -> None:
        data = asdict(self)
        paths.atomic_write_text(self.path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, name: str) -> SessionSpec:
        path = sessions_dir() / f"{name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"no labelling session named {name!r}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"the session file {path} cannot be read: {exc}") from None
        try:
            return cls(
                name=data["name"],
                prompts=data["prompts"],
                side_a=Side(**data["side_a"]),
                side_b=Side(**data["side_b"]),
                sampling=Sampling(**data.get("sampling", {})),
                pairs_per_prompt=data.get("pairs_per_prompt", 1),
                annotator=data.get("annotator", ""),
                items=[Item(**i) for i in data.get("items", [])],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the session file {path} is not a labelling session ({exc})") from None


@dataclass(frozen=True)
class Scorer:
    """What predicts the rewards that order the queue: ``kind`` ``reward_model`` (``source``: a reward run's id or
    its adapter folder, holding ``reward_head.safetensors``) or ``implicit_dpo`` (``source``: a DPO run's id or an
    adapter folder; the reward is ``beta`` * sum of log pi - log pi_ref over the answer, pi_ref the ``reference``:
    '' the base, or the adapter the DPO run started from, as a run id or ``RUN:step-N``)."""

    kind: str
    source: str
    reference: str = ""
    beta: float = 0.1
    name: str = ""  # how the person knows it (a run's name)

    def __post_init__(self) -> None:
        if self.kind not in ("reward_model", "implicit_dpo"):
            raise ValueError(f"a scorer is a reward model or a DPO adapter, not {self.kind!r}")
        if not self.source.strip():
            raise ValueError("choose a scorer: a reward model (a reward run or its folder) or a DPO run's adapter")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"the scorer's beta must be above 0, not {self.beta!r}")

    @property
    def key(self) -> str:
        """Names the scorer's rewards in :class:`Predictions`."""
        return f"{self.kind}:{self.source}" + (f" against {self.reference}" if self.reference else "")

    def label(self) -> str:
        what = "reward model" if self.kind == "reward_model" else "implicit reward of"
        return f"{what} {self.name or self.source}"


def split_adapter_ref(ref: str) -> tuple[str, int | None]:
    """``RUN:step-000050`` -> (``RUN``, 50); anything else -> (ref, None)."""
    m = re.fullmatch(r"(.+):step-0*(\d+)", ref)
    return (m.group(1), int(m.group(2))) if m else (ref, None)


def scorer_for_run(run: Any) -> Scorer | None:
    """The scorer a finished run offers: a ``reward`` run's reward model, a ``dpo`` run's implicit reward (against
    the adapter it started from, with its beta); None for other objectives."""
    try:
        config = json.loads(field_of(run, "config") or "{}")
    except (TypeError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    objective, rid, name = field_of(run, "objective"), str(field_of(run, "id") or ""), str(field_of(run, "name") or "")
    if objective == "reward":
        return Scorer("reward_model", rid, name=name)
    if objective == "dpo":
        beta = config.get("dpo_beta", 0.1)
        beta = float(beta) if isinstance(beta, int | float) and beta > 0 else 0.1
        return Scorer("implicit_dpo", rid, reference=str(config.get("init_adapter") or ""), beta=beta, name=name)
    return None


def scorer_for_folder(folder: str) -> Scorer:
    """A folder typed or picked: a reward model when it holds a reward head, else an adapter scored by its implicit
    reward against the base (beta 0.1)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"the scorer folder {folder!r} does not exist")
    if (path / "reward_head.safetensors").exists() or (path / "reward_head.json").exists():
        return Scorer("reward_model", str(path), name=path.name)
    if not (path / "adapter_config.json").exists():
        raise ValueError(
            f"{path.name} is neither a reward model (no reward_head.safetensors) nor an adapter "
            "(no adapter_config.json)"
        )
    return Scorer("implicit_dpo", str(path), name=path.name)


class Predictions:
    """The rewards each scorer predicted for a session's answers (candidate id -> reward), the queue order and the
    scorer chosen, kept beside the session (written atomically)."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.order: Order = "added"
        self.scorer: Scorer | None = None
        self.rewards: dict[str, dict[str, float]] = {}  # scorer key -> candidate id -> reward

    @property
    def path(self) -> Path:
        return sessions_dir() / "scores" / f"{self.session}.json"

    @classmethod
    def load(cls, session: str) -> Predictions:
        """The session's predictions (none yet when the file is missing or unreadable: they can be made again)."""
        out = cls(session)
        try:
            data = json.loads(out.path.read_text(encoding="utf-8"))
            out.order = parse_order(str(data.get("order", "added")))
            scorer = data.get("scorer")
            out.scorer = Scorer(**scorer) if isinstance(scorer, dict) else None
            out.rewards = {
                str(k): {str(c): float(r) for c, r in v.items() if isinstance(r, int | float)}
                for k, v in data.get("rewards", {}).items()
                if isinstance(v, dict)
            }
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return out

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "order": self.order,
            "scorer": asdict(self.scorer) if self.scorer is not None else None,
            "rewards": self.rewards,
        }
        paths.atomic_write_text(self.path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    def of(self, scorer: Scorer | None) -> dict[str, float]:
        return self.rewards.get(scorer.key, {}) if scorer is not None else {}


def list_sessions() -> list[str]:
    files = sorted(sessions_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in files]


def prompts_from_text(text: str) -> list[str]:
    """Prompts typed or pasted: one per line, or JSONL rows (a ``prompt`` field, or ``messages`` whose first user
    turn is taken; answers are left out)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                prompt = prompt_of_row(row)
                if prompt:
                    out.append(prompt)
                continue
        out.append(line)
    return out


def prompt_of_row(row: dict) -> str:
    """The prompt of one dataset row (SFT messages, TRL/Alpaca fields, preference data), without its answer."""
    for key in ("prompt", "instruction", "question", "input"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, list):
            row = {"messages": value}
            break
    for key in ("messages", "conversations", "chosen"):
        turns = row.get(key)
        if isinstance(turns, list):
            for t in turns:
                if isinstance(t, dict) and t.get("role", t.get("from")) in ("user", "human"):
                    text = t.get("content", t.get("value"))
                    if isinstance(text, str) and text.strip():
                        return text.strip()
    return ""


def prompts_from_file(path: str | Path, limit: int = 1000) -> list[str]:
    """The prompts of a JSONL or JSON dataset file (answers left out)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path.name} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        rows = rows if isinstance(rows, list) else []
        prompts = [p for p in (prompt_of_row(r) for r in rows if isinstance(r, dict)) if p]
    else:
        prompts = [p for p in prompts_from_text(text) if p]
    if not prompts:
        raise ValueError(f"{path.name} holds no prompts (expected rows with 'messages', 'prompt' or 'instruction')")
    return list(dict.fromkeys(prompts))[:limit]


class Labeller:
    """Decisions on a session's items, written to the store at once, with an undo stack (this sitting's)."""

    def __init__(self, prefs: PreferenceStore, spec: SessionSpec, annotator: str | None = None):
        self.prefs, self.spec = prefs, spec
        self.annotator = spec.annotator if annotator is None else annotator  # a second annotator: their name
        self._undo: list[tuple] = []

    def state(self, item: Item) -> ItemState:
        conn = self.prefs.conn
        lo, hi = sorted((item.a, item.b))
        row = conn.execute(
            "SELECT id, decision, strength, shown_left FROM comparisons WHERE candidate_a = ? AND candidate_b = ? "
            "AND annotator = ?",
            (lo, hi, self.annotator),
        ).fetchone()
        edit = conn.execute(
            "SELECT e.comparison_id, c.text FROM edits e JOIN candidates c ON c.id = e.edited_id "
            "WHERE e.original_id IN (?, ?) AND e.annotator = ? ORDER BY e.id DESC LIMIT 1",
            (item.a, item.b, self.annotator),
        ).fetchone()
        if edit is not None:
            return ItemState("edit", None, edit[0], edit[1])
        if row is None:
            return ItemState()
        cid, decision, strength, _ = row
        d = Decision(decision)
        if d.gives_pair:
            chosen = lo if d is Decision.A else hi
            return ItemState("left" if chosen == item.left else "right", strength, cid)
        return ItemState(d.value, strength, cid)

    def decide(self, item: Item, choice: str, strength: float | None = None) -> int:
        """``choice``: 'left', 'right', 'tie', 'both_bad' or 'skip'. Returns the comparison id."""
        decisions = {"left": Decision.A, "right": Decision.B, "tie": Decision.TIE, "both_bad": Decision.BOTH_BAD}
        decision = decisions.get(choice, Decision.SKIP if choice == "skip" else None)
        if decision is None:
            raise PreferenceError(f"unknown choice {choice!r}")
        if not decision.gives_pair:
            strength = None
        before = self.state(item)
        if before.decision == "edit":
            raise PreferenceError("this item was answered with an edit: undo it (Ctrl+Z) before deciding again")
        previous = None
        if before.comparison_id is not None:
            previous = self.prefs.comparison(before.comparison_id)
        cid = self.prefs.compare(
            item.left,
            item.right,
            decision,
            strength=strength,
            shown_left=item.left,
            annotator=self.annotator,
            source=self.spec.source,
        )
        self._undo.append(("compare", item, cid, previous))
        return cid

    def edit(self, item: Item, side: str, text: str) -> str:
        """A rewrite of the ``side`` ('left'/'right') answer: it becomes chosen, the original rejected."""
        original_id = item.left if side == "left" else item.right
        original = self.prefs.candidate(original_id)
        if text.strip() == "":
            raise PreferenceError("the edited answer is empty")
        if text.strip() == original["text"].strip():
            raise PreferenceError("the edit is identical to the original answer: change it, or press Esc")
        if self.state(item).decision == "edit":
            raise PreferenceError("this item already has an edit: undo it (Ctrl+Z) first")
        edited = self.prefs.edit(original_id, text, annotator=self.annotator)
        edit_id = self.prefs.conn.execute(
            "SELECT id, comparison_id FROM edits WHERE edited_id = ? AND original_id = ? ORDER BY id DESC LIMIT 1",
            (edited, original_id),
        ).fetchone()
        self._undo.append(("edit", item, edit_id[0], edit_id[1], edited))
        return edited

    def candidates_of(self, item: Item) -> list[str]:
        """Every candidate of the item's prompt in this session, in the order shown (each item's left, then right)."""
        out: list[str] = []
        for other in self.spec.items:
            if other.prompt_id == item.prompt_id:
                out += [c for c in (other.left, other.right) if c not in out]
        return out

    def rank(self, item: Item, ordered: list[str]) -> list[int]:
        """A ranking, best first, of the prompt's candidates: C(K, 2) comparisons (the session's items among them)."""
        if sorted(ordered) != sorted(self.candidates_of(item)):
            raise PreferenceError("rank every candidate of this prompt exactly once")
        conn = self.prefs.conn
        before = {}
        for i, x in enumerate(ordered):
            for y in ordered[i + 1 :]:
                lo, hi = sorted((x, y))
                row = conn.execute(
                    "SELECT id FROM comparisons WHERE candidate_a = ? AND candidate_b = ? AND annotator = ?",
                    (lo, hi, self.annotator),
                ).fetchone()
                if row is not None:
                    before[row[0]] = self.prefs.comparison(row[0])
        ids = self.prefs.rank(ordered, annotator=self.annotator, source=self.spec.source)
        self._undo.append(("rank", item, [(cid, before.get(cid)) for cid in ids]))
        return ids

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def undo(self) -> Item | None:
        """Take back the last decision or edit of this sitting (the store as before it); returns its item."""
        if not self._undo:
            return None
        entry = self._undo.pop()
        conn = self.prefs.conn
        if entry[0] in ("compare", "rank"):
            item = entry[1]
            restores = [(entry[2], entry[3])] if entry[0] == "compare" else entry[2]
            with transaction(conn):
                for cid, previous in restores:
                    self._restore(cid, previous)
            return item
        _, item, edit_id, cid, edited = entry  # an edit
        with transaction(conn) as c:
            c.execute("DELETE FROM edits WHERE id = ?", (edit_id,))
            c.execute("DELETE FROM decision_changes WHERE comparison_id = ?", (cid,))
            c.execute("DELETE FROM comparisons WHERE id = ?", (cid,))
            used = c.execute(
                "SELECT 1 FROM comparisons WHERE candidate_a = ? OR candidate_b = ? LIMIT 1", (edited, edited)
            ).fetchone()
            if used is None:
                c.execute("DELETE FROM candidates WHERE id = ?", (edited,))
        return item

    def _restore(self, cid: int, previous: dict | None) -> None:
        """A comparison as it was before (``None``: it did not exist)."""
        if previous is None:
            self.prefs.conn.execute("DELETE FROM decision_changes WHERE comparison_id = ?", (cid,))
            self.prefs.conn.execute("DELETE FROM comparisons WHERE id = ?", (cid,))
            return
        self.prefs.compare(
            previous["candidate_a"],
            previous["candidate_b"],
            previous["decision"],
            strength=previous["strength"],
            shown_left=previous["shown_left"],
            annotator=previous["annotator"],
            source=previous["source"],
        )


@dataclass(frozen=True)
class Progress:
    items: int
    done: int
    left: int  # picked the left answer
    right: int
    ties: int
    both_bad: int
    skips: int
    edits: int
    per_hour: float | None = None  # decisions per hour over this session's span of decisions

    @property
    def remaining(self) -> int:
        return self.items - self.done

    @property
    def left_rate(self) -> float | None:
        """Share of left picks among left/right picks (0.5 without position bias)."""
        picks = self.left + self.right
        return self.left / picks if picks else None


def progress(labeller: Labeller, items: list[Item]) -> Progress:
    counts = {"left": 0, "right": 0, "tie": 0, "both_bad": 0, "skip": 0, "edit": 0}
    for item in items:
        d = labeller.state(item).decision
        if d:
            counts[d] += 1
    return Progress(
        items=len(items),
        done=sum(counts.values()),
        left=counts["left"],
        right=counts["right"],
        ties=counts["tie"],
        both_bad=counts["both_bad"],
        skips=counts["skip"],
        edits=counts["edit"],
        per_hour=_per_hour(labeller),
    )


def _per_hour(labeller: Labeller) -> float | None:
    n, first, last = labeller.prefs.conn.execute(
        "SELECT count(*), min(updated_at), max(updated_at) FROM comparisons WHERE source = ? AND annotator = ?",
        (labeller.spec.source, labeller.annotator),
    ).fetchone()
    if n < 2 or last - first < 1:
        return None
    return (n - 1) * 3600 / (last - first)


def picks(labeller: Labeller, items: list[Item]) -> list[tuple[str, str]]:
    """This annotator's picks of a side on the session's items, oldest first (by when each was last decided):
    (chosen candidate, rejected candidate). Ties, both bad, skips and edits are not picks."""
    pairs = {tuple(sorted((i.a, i.b))) for i in items}
    rows = labeller.prefs.conn.execute(
        "SELECT candidate_a, candidate_b, decision FROM comparisons WHERE annotator = ? AND source = ? "
        "AND decision IN ('a', 'b') ORDER BY updated_at, id",
        (labeller.annotator, labeller.spec.source),
    ).fetchall()
    return [(a, b) if d == "a" else (b, a) for a, b, d in rows if (a, b) in pairs]


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 tie', '2 ties'; ``many`` where the plural is not ``one`` + 's' ('both bad')."""
    return f"{n} {one if n == 1 else (many if many is not None else one + 's')}"


def policy_text(left_out: dict[str, int]) -> str:
    """How ties, both-bad and skips go into an export: they are left out (no preferred side)."""
    names = {"tie": ("tie", "ties"), "both_bad": ("both bad", "both bad"), "skip": ("skip", "skips")}
    parts = [plural(left_out.get(d, 0), one, many) for d, (one, many) in names.items()]
    return f"Left out of DPO data (no preferred side): {', '.join(parts)}. Edits export as edited > original."


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two annotators' labels on the same items: (p_o - p_e) / (1 - p_e), where p_o is the
    share of items they agree on and p_e the agreement expected from each one's label frequencies. None without
    items; 1.0 when both always give the one same label."""
    n = len(pairs)
    if not n:
        return None
    observed = sum(a == b for a, b in pairs) / n
    labels = {x for pair in pairs for x in pair}
    expected = sum((sum(a == k for a, _ in pairs) / n) * (sum(b == k for _, b in pairs) / n) for k in labels)
    if expected == 1:
        return 1.0
    return (observed - expected) / (1 - expected)


def agreement(labeller: Labeller, items: list[Item]) -> dict[str, tuple[float | None, int]]:
    """Cohen's kappa of this annotator against each other annotator who compared the same items:
    other -> (kappa, items both labelled). Labels are the stored decisions (the same orientation for both)."""
    conn = labeller.prefs.conn
    mine: dict[tuple[str, str], str] = {}
    theirs: dict[str, dict[tuple[str, str], str]] = {}
    for item in items:
        lo, hi = sorted((item.a, item.b))
        rows = conn.execute(
            "SELECT annotator, decision FROM comparisons WHERE candidate_a = ? AND candidate_b = ?", (lo, hi)
        ).fetchall()
        for annotator, decision in rows:
            if annotator == labeller.annotator:
                mine[(lo, hi)] = decision
            else:
                theirs.setdefault(annotator, {})[(lo, hi)] = decision
    out = {}
    for other, labels in sorted(theirs.items()):
        pairs = [(mine[k], v) for k, v in labels.items() if k in mine]
        if pairs:
            out[other] = (cohen_kappa(pairs), len(pairs))
    return out
