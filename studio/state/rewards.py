"""The rewards editor's model, Qt-free: the reward functions a GRPO run scores its answers with.

The set-up form keeps every field as the form gives it, and so does this editor: ``SetupState.values["rewards"]`` is
a list of rows, each a dict of the texts and check marks the person entered (``{"kind": "length", "weight": "0.5",
"max_tokens": "40"}``). :func:`typed_specs` turns the rows into ``TrainConfig.rewards`` (weights and whole numbers as
numbers, a JSON schema as an object, empty optional fields left out); :func:`form_rows` does the opposite for a
preset or a past run's config. A value that cannot be read (a weight of ``abc``) is a :class:`ConfigError` naming
the reward by its place and name, so the editor can show it beside that reward.

:data:`KINDS` describes each kind for a person: its label, one sentence on what it rewards, and its parameters
(the names ``core.rewards.parse_rewards`` reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from finetune_studio.core.config import ConfigError

ParamType = Literal["text", "texts", "int", "float", "bool", "json_or_path", "file", "folder", "column"]
FIELD = "rewards"


@dataclass(frozen=True)
class Param:
    """One parameter of a reward kind, as the editor shows it."""

    name: str
    label: str
    type: ParamType
    help: str
    required: bool = False
    default: Any = None  # shown as the field's placeholder (text) or its state (check box); None: nothing

    @property
    def placeholder(self) -> str:
        if self.default is not None and self.type != "bool":
            return str(self.default)
        return "required" if self.required else "optional"


@dataclass(frozen=True)
class Kind:
    name: str
    label: str
    sentence: str  # what it rewards, in one sentence
    params: tuple[Param, ...] = ()


ANSWER_COLUMN = "answer"  # the column a GRPO run gives the rewards: each prompt's reference answer
_COLUMN_HELP = (
    "The column holding each prompt's reference answer. A GRPO run gives the rewards the dataset's answer (a "
    "conversation's last assistant turn, or its answer / completion column) as 'answer'."
)
_AFTER_THINK = Param(
    "after_think",
    "Score only the part after </think>",
    "bool",
    "With a think-then-answer format: look only at what follows the reasoning.",
    default=False,
)
_IGNORE_CASE = Param("ignore_case", "Ignore case", "bool", "Upper and lower case count as the same.", default=False)
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("json_valid", "Valid JSON", "1 when the whole answer parses as JSON, else 0.", (_AFTER_THINK,)),
        Kind(
            "json_schema",
            "JSON matching a schema",
            "1 when the answer is JSON that the schema accepts, else 0.",
            (
                Param(
                    "schema",
                    "Schema",
                    "json_or_path",
                    'A JSON Schema as JSON text ({"type": "object", ...}) or the path of a .json file holding one.',
                    required=True,
                ),
                _AFTER_THINK,
            ),
        ),
        Kind(
            "exact_match",
            "Exact match",
            "1 when the answer equals the reference column, else 0.",
            (
                Param("column", "Reference column", "column", _COLUMN_HELP, required=True, default=ANSWER_COLUMN),
                Param(
                    "normalize",
                    "Ignore case, spaces and punctuation",
                    "bool",
                    "Compare after lower-casing and dropping punctuation and extra spaces.",
                    default=False,
                ),
                Param(
                    "json", "Compare as JSON", "bool", "Equal when both parse to the same JSON value.", default=False
                ),
                _AFTER_THINK,
            ),
        ),
        Kind(
            "token_f1",
            "Token F1",
            "The word overlap (F1, 0 to 1) between the answer and the reference column.",
            (
                Param("column", "Reference column", "column", _COLUMN_HELP, required=True, default=ANSWER_COLUMN),
                _AFTER_THINK,
            ),
        ),
        Kind(
            "regex",
            "Regular expression",
            "1 when the answer matches the pattern, else 0.",
            (
                Param("pattern", "Pattern", "text", "A Python regular expression.", required=True),
                Param("full", "Whole answer must match", "bool", "Off: the pattern may match anywhere.", default=False),
                _AFTER_THINK,
            ),
        ),
        Kind(
            "length",
            "Length window",
            "1 when the answer's length lies in the window (in tokens or in characters, not both), less the "
            "further it falls outside.",
            (
                Param("min_tokens", "Min tokens", "int", "Shortest answer, in tokens, that scores fully."),
                Param("max_tokens", "Max tokens", "int", "Longest answer, in tokens, that scores fully."),
                Param("min_chars", "Min characters", "int", "Shortest answer, in characters, that scores fully."),
                Param("max_chars", "Max characters", "int", "Longest answer, in characters, that scores fully."),
                Param(
                    "soft",
                    "Fall off gradually outside the window",
                    "bool",
                    "Off: 0 as soon as the answer leaves the window.",
                    default=True,
                ),
            ),
        ),
        Kind(
            "contains",
            "Contains",
            "1 when the answer contains the text, else 0.",
            (
                Param(
                    "text",
                    "Text",
                    "texts",
                    'The text the answer should contain (several: a JSON list, ["a", "b"]).',
                    required=True,
                ),
                _IGNORE_CASE,
                _AFTER_THINK,
            ),
        ),
        Kind(
            "not_contains",
            "Must not contain",
            "1 when the answer does not contain the text, else 0.",
            (
                Param(
                    "text",
                    "Text",
                    "texts",
                    'The text the answer must not contain (several: a JSON list, ["a", "b"]).',
                    required=True,
                ),
                _IGNORE_CASE,
                _AFTER_THINK,
            ),
        ),
        Kind(
            "think_answer",
            "Think, then answer",
            "1 when the answer reasons inside <think>...</think> and then gives its answer, else 0.",
            (
                Param(
                    "answer_tag",
                    "Answer inside <answer>...</answer>",
                    "bool",
                    "The answer after the reasoning must sit in <answer> tags.",
                    default=False,
                ),
            ),
        ),
        Kind(
            "json_fields",
            "JSON fields right",
            "The share of the reference JSON object's fields (in the reference column) that the answer gets exactly "
            "right, as JSON values of the same type.",
            (
                Param(
                    "column",
                    "Reference column",
                    "column",
                    "The column holding each prompt's reference JSON object (a GRPO run gives the dataset's answer "
                    "as 'answer').",
                    required=True,
                    default=ANSWER_COLUMN,
                ),
                Param(
                    "fields",
                    "Fields",
                    "texts",
                    'The keys that are scored (several: a JSON list, ["name", "age"]); empty: all of the reference\'s.',
                ),
                Param(
                    "exact_keys",
                    "Exactly the reference's keys",
                    "bool",
                    "An answer with a key more or fewer than the reference scores 0.",
                    default=True,
                ),
                Param(
                    "partial",
                    "Partial credit",
                    "bool",
                    "Off: 1 only when every scored field is right, else 0.",
                    default=True,
                ),
                _AFTER_THINK,
            ),
        ),
        Kind(
            "python",
            "Python function",
            "Your own function, run in a sandboxed process: it gets the prompts, the completions and the dataset's "
            "other columns, and returns one number per completion.",
            (
                Param("path", "Python file", "file", "The .py file that defines the function.", required=True),
                Param("function", "Function", "text", "The function's name in that file.", default="reward"),
                Param(
                    "timeout_s",
                    "Time limit (s)",
                    "float",
                    "Wall-clock seconds per call before it is stopped.",
                    default=30,
                ),
                Param("memory_mb", "Memory limit (MiB)", "int", "Memory the function's process may use.", default=2048),
            ),
        ),
        Kind(
            "reward_model",
            "Reward model",
            "The score of a reward model trained on your preference labels (objective Reward model).",
            (
                Param(
                    "adapter",
                    "Reward model",
                    "folder",
                    "A reward model's folder (adapter and reward head) or the id of the run that trained it.",
                    required=True,
                ),
            ),
        ),
    )
}
DEFAULT_WEIGHT = 1.0


def kind_label(kind: str) -> str:
    return KINDS[kind].label if kind in KINDS else kind


def row_title(index: int, row: dict[str, Any]) -> str:
    """'Reward 2 (length)' or, when the person named it, "Reward 'short answers'" (as core.rewards names them)."""
    name = str(row.get("name", "") or "").strip()
    return f"Reward {name!r}" if name else f"Reward {index + 1} ({row.get('kind', '')})"


def new_row(kind: str) -> dict[str, Any]:
    """A fresh row of ``kind``: weight 1, check boxes at their defaults, the reference column 'answer', other text
    fields empty."""
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}")
    row: dict[str, Any] = {"kind": kind, "name": "", "weight": f"{DEFAULT_WEIGHT:g}"}
    for p in KINDS[kind].params:
        row[p.name] = bool(p.default) if p.type == "bool" else p.default if p.type == "column" else ""
    return row


# --- form rows <-> TrainConfig.rewards ------------------------------------------------------------------------------


def typed_spec(index: int, row: dict[str, Any]) -> dict[str, Any]:
    """One row as a ``TrainConfig.rewards`` entry; :class:`ConfigError` ('rewards') naming the reward and the field
    when a value cannot be read. Keys this editor does not know (a loaded config's extras) pass through as they are."""
    if not isinstance(row, dict):
        raise ConfigError(FIELD, f"Reward {index + 1} must be a mapping such as {{'kind': 'json_valid'}}")
    kind = row.get("kind")
    title = row_title(index, row)
    out: dict[str, Any] = {"kind": kind}
    name = str(row.get("name", "") or "").strip()
    if name:
        out["name"] = name
    out["weight"] = _number(
        row.get("weight", DEFAULT_WEIGHT), f"{title}: the weight", whole=False, empty=DEFAULT_WEIGHT
    )
    params = {p.name: p for p in KINDS[kind].params} if kind in KINDS else {}
    for key, value in row.items():
        if key in ("kind", "name", "weight"):
            continue
        param = params.get(key)
        if param is None:
            out[key] = value
            continue
        typed = _param_value(param, value, title)
        if typed is not None:
            out[key] = typed
    return out


def typed_specs(rows: Any) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise ConfigError(FIELD, "must be a list of reward functions")
    return [typed_spec(i, row) for i, row in enumerate(rows)]


def form_row(spec: Any) -> dict[str, Any]:
    """A ``TrainConfig.rewards`` entry as the editor shows it: numbers as text, a schema object as JSON text."""
    if not isinstance(spec, dict):
        return {"kind": "", "name": "", "weight": str(spec)}
    kind = str(spec.get("kind", ""))
    row = new_row(kind) if kind in KINDS else {"kind": kind, "name": "", "weight": f"{DEFAULT_WEIGHT:g}"}
    params = {p.name: p for p in KINDS[kind].params} if kind in KINDS else {}
    for key, value in spec.items():
        if key == "kind":
            continue
        if key == "name":
            row["name"] = "" if value is None else str(value)
        elif key == "weight":
            row["weight"] = _text(value)
        elif key in params and params[key].type == "bool":
            row[key] = value
        elif key in params and params[key].type in ("json_or_path", "texts") and isinstance(value, (dict, list)):
            row[key] = json.dumps(value)
        elif key in params:
            row[key] = _text(value)
        else:
            row[key] = value
    return row


def form_rows(specs: Any) -> list[dict[str, Any]]:
    return [form_row(s) for s in specs] if isinstance(specs, list) else []


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value: Any, what: str, *, whole: bool, empty: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return empty
        try:
            value = int(value) if whole else float(value)
        except ValueError:
            kind = "a whole number" if whole else "a number"
            raise ConfigError(FIELD, f"{what} must be {kind}, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(FIELD, f"{what} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ConfigError(FIELD, f"{what} must be a finite number, not {value!r}")
    return value


def _param_value(param: Param, value: Any, title: str) -> Any:
    """The parameter's typed value; None leaves it out (an empty optional field)."""
    what = f"{title}: {param.label.lower()}"
    if param.type == "bool":
        return bool(value) if isinstance(value, bool) else value
    if param.type in ("int", "float"):
        return _number(value, what, whole=param.type == "int", empty=None)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None  # a required one missing: core.rewards says what it needs
    if (param.type == "json_or_path" and text[:1] in "{[") or (param.type == "texts" and text[:1] == "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(FIELD, f"{what} is not valid JSON ({exc.msg} at character {exc.pos + 1})") from None
    return text


def reason(exc: ConfigError) -> str:
    """The message without a leading 'rewards: ', starting with a capital."""
    text = str(exc)
    prefix = f"{exc.field}: "
    text = text[len(prefix) :] if text.startswith(prefix) else text
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class RewardsCheck:
    """What is wrong with the rows: per row (by index) and for the list as a whole ('' when nothing)."""

    rows: dict[int, str]
    whole: str = ""

    @property
    def ok(self) -> bool:
        return not self.rows and not self.whole

    def summary(self) -> str:
        """One message for the set-up form's error list: the first problem, and how many more."""
        messages = [self.rows[i] for i in sorted(self.rows)] + ([self.whole] if self.whole else [])
        if not messages:
            return ""
        more = len(messages) - 1
        return messages[0] + (f" (and {more} more problem{'s' * (more > 1)} below)" if more else "")


def check_rows(rows: Any, *, needed: bool) -> RewardsCheck:
    """Each row alone (read, then ``core.rewards.parse_rewards`` on it), then the whole list, so every bad reward gets
    its own message. ``needed``: the objective scores answers with them (GRPO), so an empty list is a problem."""
    if not isinstance(rows, list):
        return RewardsCheck({}, "The rewards must be a list of reward functions.")
    errors: dict[int, str] = {}
    specs = []
    for i, row in enumerate(rows):
        try:
            spec = typed_spec(i, row)
            _parse([spec])
        except ConfigError as exc:
            errors[i] = _named(i, row, reason(exc))
            continue
        specs.append(spec)
    whole = ""
    if needed and not rows:
        whole = "GRPO scores its answers with rewards: add at least one reward function."
    elif not errors and specs:
        try:
            _parse(specs)
        except ConfigError as exc:
            whole = reason(exc)
    return RewardsCheck(errors, whole)


def _named(index: int, row: Any, message: str) -> str:
    """The message as said beside the reward: starting with its title unless it already names it (a reward checked
    alone is the first of its list: its place is put right)."""
    if message.startswith("Reward 1 (") and index:
        return f"Reward {index + 1} ({message.removeprefix('Reward 1 (')}"
    if message.startswith("Reward "):
        return message
    title = row_title(index, row) if isinstance(row, dict) else f"Reward {index + 1}"
    return f"{title}: {message[:1].lower()}{message[1:]}"


def _parse(specs: list[dict[str, Any]]) -> Any:
    from finetune_studio.core.rewards import parse_rewards

    return parse_rewards(specs)
