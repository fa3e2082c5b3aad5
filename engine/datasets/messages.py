"""Turning the many ways people write a chat turn into :class:`Message`, and the user's column/role mapping.

Roles: ``user``/``human``, ``assistant``/``gpt``/``bot``/``model``, ``system``/``developer``, ``tool``/
``observation``/``function``/``ipython``, and ShareGPT's ``function_call`` (an assistant turn that calls a tool).
Contents: a string, or a list of typed parts (``{"type": "text", "text": ...}`` or ``{"type": "text",
"value": ...}``). Per-turn training weights (``loss_weight``, ``weight``, ``train``) become ``Message.train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from finetune_studio.engine.datasets.problems import RowError
from finetune_studio.engine.datasets.schema import DatasetError, Message

ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
    "function_call": "function_call",
    "tool_call": "function_call",
}
FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "conversations",
    "messages",
    "tools",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "chosen_messages",
    "rejected_messages",
    "label",
    "text",
    "score_chosen",
    "score_rejected",
)
OPTIONS = ("format", "split", "roles", "role_key", "content_key", "columns")


@dataclass(frozen=True)
class Mapping:
    """The user's override of format detection.

    Flat form: ``{"prompt": "question", "chosen": "good", "rejected": "bad"}`` maps our field names (``FIELDS``) to
    the file's column names. Options: ``format`` (skip detection), ``split`` (of a DatasetDict folder or hub
    dataset), ``roles`` (the file's role names to ours, e.g. ``{"bot": "assistant"}``), ``role_key`` and
    ``content_key`` (the keys of a turn object, e.g. ``"speaker"`` and ``"utterance"``).
    """

    columns: dict = field(default_factory=dict)  # our field -> the file's column
    format: str | None = None
    split: str | None = None
    roles: dict = field(default_factory=dict)
    role_key: str | None = None
    content_key: str | None = None

    @classmethod
    def parse(cls, raw: dict | None) -> Mapping:
        if not raw:
            return cls()
        if not isinstance(raw, dict):
            raise DatasetError('the mapping must be an object like {"prompt": "question"}')
        columns = dict(raw.get("columns") or {})
        for key, value in raw.items():
            if key in FIELDS:
                columns[key] = value
            elif key not in OPTIONS:
                raise DatasetError(
                    f"unknown mapping key '{key}': use our field names ({', '.join(FIELDS)}) "
                    f"or the options {', '.join(OPTIONS)}"
                )
        for ours, theirs in columns.items():
            if ours not in FIELDS:
                raise DatasetError(f"unknown field '{ours}' in the mapping; fields are: {', '.join(FIELDS)}")
            if not isinstance(theirs, str) or not theirs:
                raise DatasetError(f"mapping for '{ours}' must name a column (a non-empty string)")
        roles = raw.get("roles") or {}
        if not isinstance(roles, dict) or any(ROLE_NAMES.get(str(v).lower()) is None for v in roles.values()):
            raise DatasetError(
                "mapping 'roles' must map the file's role names to user, assistant, system, tool or function_call"
            )
        return cls(
            columns,
            raw.get("format"),
            raw.get("split"),
            {str(k): ROLE_NAMES[str(v).lower()] for k, v in roles.items()},
            raw.get("role_key"),
            raw.get("content_key"),
        )

    def apply(self, row: dict) -> dict:
        """The row with the mapped columns renamed to our field names."""
        if not self.columns:
            return row
        out = dict(row)
        for ours, theirs in self.columns.items():
            if theirs in row:
                out.pop(theirs, None)
                out[ours] = row[theirs]
        return out


def maybe_json(value):
    """Lists and objects stored as JSON text (CSV cells, some hub datasets) decoded; anything else unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def content_text(value, where: str) -> str:
    """A turn's content as text: a string, or the text parts of a typed-parts list joined by newlines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"{where}: content is {type(value).__name__}, expected text", "content that is not text")
    texts = []
    for part in value:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part, dict):
            raise RowError(
                f"{where}: has a '{kind}' part; only text is supported",
                f"turns with '{kind}' parts (only text is supported)",
            )
        text = next((part[k] for k in ("text", "value", "content") if k in part), None)
        if not isinstance(text, str):
            raise RowError(f"{where}: a text part has no 'text' or 'value' string", "text parts without text")
        texts.append(text)
    return "\n".join(texts)


def tool_call(obj, where: str) -> dict:
    """One tool call in OpenAI form: ``{"type": "function", "function": {"name", "arguments"}}``."""
    if not isinstance(obj, dict):
        raise RowError(f"{where}: a tool call must be an object with 'name' and 'arguments'", "malformed tool calls")
    fn = obj["function"] if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RowError(f"{where}: a tool call has no 'name'", "malformed tool calls")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            pass  # keep the text: some templates take arguments as a string
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if obj.get("id"):
        out["id"] = obj["id"]
    return out


def tool_calls_from_text(text: str, where: str) -> tuple:
    """ShareGPT's ``function_call`` value: JSON of one call ``{"name", "arguments"}`` or a list of them."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        raise RowError(
            f"{where}: function_call value is not JSON with 'name' and 'arguments'",
            "function_call turns that are not JSON",
        ) from None
    calls = value if isinstance(value, list) else [value]
    return tuple(tool_call(c, where) for c in calls)


def parse_tools(value, where: str = "tools") -> tuple:
    """Tool schemas, as a tuple of ``{"type": "function", "function": {...}}`` objects."""
    value = maybe_json(value)
    if value in (None, "", [], {}):
        return ()
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError(f"'{where}' must be a list of tool schemas (or that list as JSON text)", "malformed 'tools'")
    return tuple(
        t
        if t.get("type") == "function" and isinstance(t.get("function"), dict)
        else {"type": "function", "function": t}
        for t in value
    )


def _train_flag(obj: dict) -> bool | None:
    for key in ("loss_weight", "weight"):
        if isinstance(obj.get(key), (int, float)) and not isinstance(obj.get(key), bool):
            return obj[key] > 0
    return obj["train"] if isinstance(obj.get("train"), bool) else None


def parse_message(obj, mapping: Mapping, where: str) -> Message:
    """One turn object (``role``/``content``, ``from``/``value`` or the mapping's keys) as a Message."""
    if not isinstance(obj, dict):
        raise RowError(f"{where}: a turn must be an object with a role and a content", "turns that are not objects")
    raw_role = obj.get(mapping.role_key) if mapping.role_key else obj.get("role", obj.get("from"))
    if mapping.content_key:
        raw_content = obj.get(mapping.content_key)
    else:
        raw_content = next((obj[k] for k in ("content", "value", "text") if k in obj), None)
    role = mapping.roles.get(str(raw_role)) or ROLE_NAMES.get(str(raw_role).lower())
    if role is None:
        raise RowError(
            f'{where}: unknown role \'{raw_role}\' (map it, e.g. {{"roles": {{"{raw_role}": "assistant"}}}})',
            f"turns with unknown role '{raw_role}'",
        )
    text = content_text(raw_content, where)
    if role == "function_call":
        return Message("assistant", "", tool_calls_from_text(text, where), _train_flag(obj))
    calls = obj.get("tool_calls") or ()
    if calls:
        if not isinstance(calls, list):
            raise RowError(f"{where}: 'tool_calls' must be a list", "malformed tool calls")
        calls = tuple(tool_call(c, where) for c in calls)
    return Message(role, text, tuple(calls), _train_flag(obj))


def parse_messages(value, mapping: Mapping, name: str) -> tuple[Message, ...]:
    """A list of turns (or that list as JSON text) as Messages; an empty or missing list is a RowError."""
    value = maybe_json(value)
    if value is None or value == [] or value == "":
        raise RowError(f"'{name}' is empty or missing", f"rows with an empty '{name}'")
    if not isinstance(value, list):
        raise RowError(
            f"'{name}' must be a list of turns, found {type(value).__name__}",
            f"rows whose '{name}' is not a list of turns",
        )
    return tuple(parse_message(m, mapping, f"{name}[{i}]") for i, m in enumerate(value))


def without_train_flags(msgs: tuple[Message, ...]) -> tuple[Message, ...]:
    """Preference data trains on whole answers: per-turn weights do not apply."""
    return tuple(Message(m.role, m.content, m.tool_calls) if m.train is not None else m for m in msgs)
