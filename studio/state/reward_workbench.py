"""The reward workbench's state, Qt-free: a handful of the dataset's prompts, the model's answers, their scores.

Before a GRPO run a person samples a few answers per prompt from the model the run would start from and sees what
each reward function makes of them: every answer's score per function and the weighted total, each function's mean
and spread, and the best and worst answer of each prompt. :func:`read_prompts` takes the prompts (and the dataset's
other columns, which reward functions may read) from the dataset file; :class:`WorkbenchResult` holds the scores and
computes the figures.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_studio.studio.state.observable import Observable

PROMPT_COLUMNS = ("prompt", "question", "instruction", "query", "input")  # looked for in this order
ANSWER_COLUMNS = ("answer", "completion", "response", "output", "chosen")
ANSWER = "answer"  # the column the rewards read the reference answer from, in training too
MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
READABLE = (".jsonl", ".json", ".csv", ".tsv")
MAX_SCANNED = 10_000  # rows looked at for prompts at most (a huge file is not read to its end)


class PromptReadError(Exception):
    """The dataset's prompts cannot be read here; the message says why and what to do."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt: its text as a person reads it, the conversation sent to the model (``messages``, or empty: the
    text is the user's message), and the columns reward functions get as keyword arguments. As in a GRPO run, that
    is the row's reference answer (its last assistant turn, or its answer / completion column) as ``answer``."""

    text: str
    messages: tuple[tuple[str, str], ...] = ()  # (role, content), ending with the user's turn
    columns: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str, count: int, mapping: dict[str, Any] | None = None) -> list[PromptRow]:
    """The first ``count`` prompts of a JSON Lines, JSON, CSV or TSV dataset, with their reference answers.

    A row's prompt is its ``prompt`` column (or the column ``mapping['prompt']`` names, or question / instruction /
    query / input) and its reference the answer / completion / response / output / chosen column (or the one the
    mapping names); or, in a conversation (``messages``), the turns before its last answer and that answer. Rows
    without a prompt are skipped. :class:`PromptReadError` when the file cannot be read or holds no prompt.
    """
    if count < 1:
        return []
    text = str(path).strip()
    if not text:
        raise PromptReadError("Choose a dataset first: the workbench samples answers to its prompts.")
    if text.startswith("pairs:"):
        raise PromptReadError(
            "The preference store holds pairs, not prompts for GRPO: choose a dataset file with a prompt column."
        )
    file = Path(text).expanduser()
    if not file.is_file() or file.suffix.lower() not in READABLE:
        kinds = ", ".join(READABLE)
        raise PromptReadError(
            f"The workbench reads prompts from {kinds} files; {file.name or text} is not one. Save a few prompts "
            'as JSON Lines ({"prompt": ...} per line) to try the rewards on them.'
        )
    prompt_key = str((mapping or {}).get("prompt", "") or "")
    answer_key = next((str(v) for k in ("answer", "completion", "chosen") if (v := (mapping or {}).get(k))), "")
    out: list[PromptRow] = []
    try:
        for i, row in enumerate(_rows(file)):
            if i >= MAX_SCANNED or len(out) >= count:
                break
            prompt = _prompt(row, prompt_key, answer_key)
            if prompt is not None:
                out.append(prompt)
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise PromptReadError(f"{file.name} could not be read: {exc}") from None
    if not out:
        where = f"a {prompt_key!r} column" if prompt_key else "a prompt column or a conversation"
        raise PromptReadError(f"{file.name} has no prompts the workbench can read: it looks for {where} in each row.")
    return out


def _rows(file: Path) -> Iterator[dict[str, Any]]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the dataset check reports the line; the other rows still have prompts
                    if isinstance(row, dict):
                        yield row
    elif suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} and similar wrappers
            data = next((v for v in data.values() if isinstance(v, list)), [])
        if isinstance(data, list):
            yield from (r for r in data if isinstance(r, dict))
    else:
        with open(file, encoding="utf-8", newline="") as fh:
            yield from csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")


def _prompt(row: dict[str, Any], prompt_key: str, answer_key: str) -> PromptRow | None:
    keys = (prompt_key,) if prompt_key else PROMPT_COLUMNS
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return PromptRow(value, (), _reference(_answer_of(row, answer_key)))
        if isinstance(value, list):  # a conversational prompt: a list of turns
            turns, _ = _split(value)
            if turns:
                return PromptRow(turns[-1][1], turns, _reference(_answer_of(row, answer_key)))
    if prompt_key:
        return None
    for key in MESSAGE_COLUMNS:
        value = row.get(key)
        if isinstance(value, list):
            turns, answer = _split(value)
            if turns:
                return PromptRow(turns[-1][1], turns, _reference(answer))
    return None


def _answer_of(row: dict[str, Any], answer_key: str) -> str | None:
    """A prompt row's reference answer: the mapped column, or answer / completion / response / output / chosen."""
    for key in (answer_key,) if answer_key else ANSWER_COLUMNS:
        value = row.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # a conversational completion: its assistant turn
            _, answer = _split([{"role": "user", "content": ""}, *value])
            if answer is not None:
                return answer
    return None


def _reference(answer: str | None) -> dict[str, Any]:
    """The columns the rewards get, as training gives them: the reference answer as ``answer`` (when there is one)."""
    return {} if answer is None else {ANSWER: answer}


def _split(messages: list[Any]) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """A conversation as training splits it: the turns before its last answer (ending with a user turn) and that
    answer (None when it has none: the whole conversation, up to its last user turn, is the prompt)."""
    turns: list[tuple[str, str]] = []
    for m in messages:
        if not isinstance(m, dict):
            return (), None
        role = str(m.get("role", m.get("from", "")))
        content = m.get("content", m.get("value", ""))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if isinstance(content, str):
            turns.append((role, content))
    answer = None
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last >= 0:
        answer, turns = turns[last][1], turns[:last]
    while turns and turns[-1][0] != "user":
        turns.pop()
    return tuple(turns), answer


# --- the scores ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionStats:
    """One reward function over every answer: mean, standard deviation (population), lowest and highest."""

    name: str
    weight: float
    mean: float
    std: float
    min: float
    max: float
    flat_prompts: int  # prompts whose answers all scored the same under this function (no signal for GRPO)

    @classmethod
    def of(cls, name: str, weight: float, values: list[float], groups: list[list[float]]) -> FunctionStats:
        return cls(
            name,
            weight,
            statistics.fmean(values),
            statistics.pstdev(values),
            min(values),
            max(values),
            sum(1 for g in groups if len(g) > 1 and max(g) - min(g) == 0),
        )


@dataclass(frozen=True)
class WorkbenchResult:
    """Answers to prompts and their scores.

    ``answers[p]`` are prompt p's answers; ``scores[name]`` every answer's score under that function, in prompt-major
    order (prompt 0's answers, then prompt 1's...); ``unscored`` maps a function left out here to why (a reward model
    the app cannot load): the total leaves it out.
    """

    prompts: list[PromptRow]
    answers: list[list[str]]
    names: list[str]
    weights: list[float]
    scores: dict[str, list[float]]
    unscored: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.prompts):
            raise ValueError("one list of answers per prompt")
        n = sum(len(a) for a in self.answers)
        for name, values in self.scores.items():
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} scores for {n} answers")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"{name}: every score must be a finite number")

    @property
    def scored(self) -> list[str]:
        return [n for n in self.names if n in self.scores]

    @property
    def count(self) -> int:
        return sum(len(a) for a in self.answers)

    def totals(self) -> list[float]:
        """Each answer's weighted sum over the functions scored here."""
        weight = dict(zip(self.names, self.weights, strict=True))
        return [math.fsum(weight[n] * self.scores[n][i] for n in self.scored) for i in range(self.count)]

    def rows(self) -> list[tuple[int, int, int]]:
        """(flat index, prompt index, answer index) for every answer, prompt by prompt."""
        out, flat = [], 0
        for p, answers in enumerate(self.answers):
            for a in range(len(answers)):
                out.append((flat, p, a))
                flat += 1
        return out

    def groups(self, values: list[float]) -> list[list[float]]:
        """``values`` (one per answer) split by prompt."""
        out, flat = [], 0
        for answers in self.answers:
            out.append(values[flat : flat + len(answers)])
            flat += len(answers)
        return out

    def stats(self) -> list[FunctionStats]:
        """Per scored function, then the weighted total (named 'total', weight 1)."""
        if not self.count:
            return []
        weight = dict(zip(self.names, self.weights, strict=True))
        out = [FunctionStats.of(n, weight[n], self.scores[n], self.groups(self.scores[n])) for n in self.scored]
        if self.scored:
            totals = self.totals()
            out.append(FunctionStats.of("total", 1.0, totals, self.groups(totals)))
        return out

    def best_and_worst(self) -> dict[int, tuple[int, int]]:
        """Per prompt, the flat indices of its best and worst answer by the total (the first one on a tie); prompts
        whose answers all have the same total are left out: nothing is better there."""
        if not self.scored:
            return {}
        out, flat = {}, 0
        totals = self.totals()
        for p, answers in enumerate(self.answers):
            group = totals[flat : flat + len(answers)]
            if len(group) > 1 and max(group) > min(group):
                out[p] = (flat + group.index(max(group)), flat + group.index(min(group)))
            flat += len(answers)
        return out


class WorkbenchState(Observable):
    """Topics: 'status' (a new status line or progress), 'result' (new scores), 'error'."""

    def __init__(self) -> None:
        super().__init__()
        self.status = ""
        self.error = ""
        self.busy = False
        self.result: WorkbenchResult | None = None

    def set_status(self, text: str, *, busy: bool) -> None:
        self.status, self.busy = text, busy
        if busy:
            self.error = ""
        self.notify("status")

    def set_result(self, result: WorkbenchResult) -> None:
        self.result, self.busy, self.error = result, False, ""
        n, p = result.count, len(result.prompts)
        left = f"; {', '.join(result.unscored)} scored during training only" if result.unscored else ""
        self.status = f"Scored {n} answer{'s' * (n != 1)} to {p} prompt{'s' * (p != 1)}{left}."
        self.notify("result")
        self.notify("status")

    def fail(self, message: str) -> None:
        self.error, self.busy = message, False
        self.status = ""
        self.notify("error")
        self.notify("status")


@dataclass(frozen=True)
class WorkbenchRequest:
    """What to sample and score: the run's model and starting adapter, the prompts, and the sampling settings."""

    model: str
    init_adapter: str
    prompts: list[PromptRow]
    rewards: list[dict[str, Any]]  # TrainConfig.rewards
    answers_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0


def starting_adapter(init_adapter: str) -> tuple[str, int | None, bool]:
    """``init_adapter`` as the generation worker attaches it: (source, checkpoint step, is the run's best).

    A folder stays a folder; ``RUN`` is the run's final adapter; ``RUN:step-000050`` / ``RUN:50`` a checkpoint;
    ``RUN:best`` needs the run's folder (the caller finds it in the store). ('', None, False): no adapter."""
    ref = init_adapter.strip()
    if not ref:
        return "", None, False
    if Path(ref).expanduser().is_dir() or ":" not in ref:
        return ref, None, False
    run, _, which = ref.partition(":")
    if which == "best":
        return run, None, True
    digits = which.removeprefix("step-")
    if digits.isdigit():
        return run, int(digits), False
    return ref, None, False


def columns_per_answer(result_prompts: list[PromptRow], answers: list[list[str]]) -> dict[str, list[Any]]:
    """The prompts' other columns, one value per answer (prompt-major), as reward functions take them; a column
    that some rows lack is None there."""
    names: list[str] = []
    for p in result_prompts:
        names.extend(k for k in p.columns if k not in names)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for prompt, group in zip(result_prompts, answers, strict=True):
        for _ in group:
            for n in names:
                out[n].append(prompt.columns.get(n))
    return out


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


def in_words(message: str) -> str:
    """A reward's error as the workbench says it: its message without the traceback a person's function raised
    with, naming instead the line of their file where it failed ('(my_reward.py, line 3, in reward)')."""
    text = message.strip()
    head, sep, trace = text.partition("Traceback (most recent call last):")
    if not sep:
        return text[:1].upper() + text[1:]
    head = head.strip()
    frames = _FRAME.findall(trace)
    if frames:
        file, line, fn = frames[-1]
        head += f" ({Path(file).name}, line {line}, in {fn})"
    return head[:1].upper() + head[1:]
