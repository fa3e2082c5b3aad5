"""The rewards a run is given in its config (``TrainConfig.rewards``), read and checked into :class:`RewardSpec`.

Each entry is a mapping ``{"kind": ..., "weight": 1.0, "name": ..., **settings}``:

===============  =============================================================================================
kind             settings (defaults in brackets)
===============  =============================================================================================
json_valid       after_think [false]
json_schema      schema: a JSON Schema as a mapping, or the path of a .json file holding one; after_think [false]
exact_match      column (the reference answer's column); normalize [false]; json [false]; after_think [false]
token_f1         column; after_think [false]
regex            pattern; full [false] (the whole answer must match, not just a part); after_think [false]
length           min_tokens / max_tokens, or min_chars / max_chars (at least one bound, one unit); soft [true]
contains         text: a string or a list of strings; ignore_case [false]; after_think [false]
not_contains     text: a string or a list of strings; ignore_case [false]; after_think [false]
think_answer     answer_tag [false] (the answer must sit in <answer>...</answer>)
json_fields      column; fields [all the reference's]; exact_keys [true]; partial [true]; after_think [false]
python           path: a .py file; function ["reward"]; timeout_s [30]; memory_mb [2048]
reward_model     adapter: a reward-model folder or a run id (scored by the engine)
===============  =============================================================================================

``weight`` (any finite number; 0 watches a function without training on it) multiplies the function's scores
in the total. ``name`` (default: the kind, with ``_2``, ``_3``... for repeats) labels the function in figures
(``reward/<name>``). What each kind scores is written in ``core.rewards.verifiers`` and ``core.rewards.sandbox``.

Relative paths are read against the current working folder; the app writes absolute ones.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_studio.core.config import ConfigError

KINDS = (
    "json_valid",
    "json_schema",
    "exact_match",
    "token_f1",
    "regex",
    "length",
    "contains",
    "not_contains",
    "think_answer",
    "json_fields",
    "python",
    "reward_model",
)
# Kinds whose score depends on a dataset column (named by their ``column`` setting).
COLUMN_KINDS = ("exact_match", "token_f1", "json_fields")
MAX_TIMEOUT_S = 3600.0
MIN_MEMORY_MB = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,64}$")
_FIELD = "rewards"


@dataclass(frozen=True)
class RewardSpec:
    """One checked reward: its kind, its unique name, its weight and its settings with defaults filled in.

    For ``json_schema`` the settings hold the schema itself (read from its file when a path was given) and
    ``schema_path`` (the file, or ``""``); for ``python`` and ``json_schema`` paths are absolute.
    """

    kind: str
    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def column(self) -> str | None:
        """The dataset column this reward reads, if any."""
        value = self.params.get("column")
        return value if isinstance(value, str) else None


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(_FIELD, f"{where}: {message}")


# --- setting checkers: each returns the cleaned value or raises ConfigError ----------------------------------------
Checker = Callable[[str, str, Any], Any]


def _bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _err(where, f"{key} must be true or false, not {value!r}")
    return value


def _text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _err(where, f"{key} must be non-empty text, not {value!r}")
    return value


def _texts(where: str, key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) and t for t in items):
        raise _err(where, f"{key} must be non-empty text or a list of non-empty texts, not {value!r}")
    return tuple(items)


def _count(where: str, key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _err(where, f"{key} must be a whole number of at least 0, not {value!r}")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _timeout(where: str, key: str, value: Any) -> float:
    number = _number(value)
    if number is None or not 0 < number <= MAX_TIMEOUT_S:
        raise _err(where, f"{key} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, not {value!r}")
    return number


def _memory(where: str, key: str, value: Any) -> int:
    count = _count(where, key, value)
    if count < MIN_MEMORY_MB:
        raise _err(where, f"{key} must be at least {MIN_MEMORY_MB} (MiB; Python itself needs about 30), not {count}")
    return count


def _regex(where: str, key: str, value: Any) -> str:
    pattern = _text(where, key, value)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _err(where, f"{key} {pattern!r} is not a valid regular expression: {exc}") from None
    return pattern


def _column(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _err(where, f"{key} must name the dataset column that holds the reference answer, not {value!r}")
    return value


def _adapter(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(where, f"{key} must be a reward model's folder or the id of the run that trained it")
    return value.strip()


def _schema(where: str, key: str, value: Any) -> Any:
    return value  # checked as a whole in _check_schema (it also needs schema_path)


def _path(where: str, key: str, value: Any) -> str:
    return _text(where, key, value)


_AFTER_THINK: dict[str, tuple[Checker, Any]] = {"after_think": (_bool, False)}
_REQUIRED = object()
# kind -> {setting: (checker, default or _REQUIRED)}
SETTINGS: dict[str, dict[str, tuple[Checker, Any]]] = {
    "json_valid": {**_AFTER_THINK},
    "json_schema": {"schema": (_schema, _REQUIRED), **_AFTER_THINK},
    "exact_match": {
        "column": (_column, _REQUIRED),
        "normalize": (_bool, False),
        "json": (_bool, False),
        **_AFTER_THINK,
    },
    "token_f1": {"column": (_column, _REQUIRED), **_AFTER_THINK},
    "regex": {"pattern": (_regex, _REQUIRED), "full": (_bool, False), **_AFTER_THINK},
    "length": {
        "min_tokens": (_count, None),
        "max_tokens": (_count, None),
        "min_chars": (_count, None),
        "max_chars": (_count, None),
        "soft": (_bool, True),
    },
    "contains": {"text": (_texts, _REQUIRED), "ignore_case": (_bool, False), **_AFTER_THINK},
    "not_contains": {"text": (_texts, _REQUIRED), "ignore_case": (_bool, False), **_AFTER_THINK},
    "think_answer": {"answer_tag": (_bool, False)},
    "python": {
        "path": (_path, _REQUIRED),
        "function": (_text, "reward"),
        "timeout_s": (_timeout, 30.0),
        "memory_mb": (_memory, 2048),
    },
    "reward_model": {"adapter": (_adapter, _REQUIRED)},
    "json_fields": {  # core.rewards.json_fields
        "column": (_column, _REQUIRED),
        "fields": (_texts, None),
        "exact_keys": (_bool, True),
        "partial": (_bool, True),
        **_AFTER_THINK,
    },
}
_HINTS = {
    "json_schema": "a JSON Schema, e.g. {'type': 'object', 'required': ['name']}, or the path of a .json file",
    "exact_match": "the dataset column that holds the reference answer",
    "token_f1": "the dataset column that holds the reference answer",
    "regex": "a regular expression the answer must match",
    "contains": "the text (or list of texts) the answer should contain",
    "not_contains": "the text (or list of texts) the answer must not contain",
    "python": "the .py file that defines your reward function",
    "reward_model": "a reward model's folder or the id of the run that trained it",
    "json_fields": "the dataset column that holds the reference JSON object",
}


def parse_rewards(specs: Any, columns: Collection[str] | None = None) -> list[RewardSpec]:
    """Check the config's ``rewards`` list and return one :class:`RewardSpec` per entry.

    ``columns``, when given, are the dataset's column names: a reward reading a column the dataset lacks is then
    an error here rather than at the first batch. A ``python`` reward's file is read (never run: its functions
    are found with :mod:`ast`), a ``json_schema``'s schema checked against its meta-schema. Raises
    ``ConfigError("rewards", ...)`` naming the entry and what to change.
    """
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(_FIELD, f"must be a list of rewards such as [{{'kind': 'json_valid'}}], not {specs!r}")
    out: list[RewardSpec] = []
    explicit: set[str] = set()
    for i, raw in enumerate(specs):
        spec = _parse_one(i, raw)
        if "name" in raw:
            if spec.name in explicit:
                raise _err(f"reward {i + 1}", f"the name {spec.name!r} is used twice; give each reward its own name")
            explicit.add(spec.name)
        out.append(spec)
    out = _unique_names(out, explicit)
    if columns is not None:
        have = set(columns)
        for spec in out:
            if spec.column is not None and spec.column not in have:
                shown = ", ".join(sorted(have)) or "none"
                raise _err(
                    f"reward {spec.name!r}",
                    f"reads the column {spec.column!r}, which the dataset does not have (its columns: {shown})",
                )
    return out


def _parse_one(i: int, raw: Any) -> RewardSpec:
    where = f"reward {i + 1}"
    if not isinstance(raw, Mapping):
        raise _err(where, f"must be a mapping such as {{'kind': 'json_valid', 'weight': 1.0}}, not {raw!r}")
    kind = raw.get("kind")
    if kind is None:
        raise _err(where, f"say which kind of reward it is with 'kind': one of {', '.join(KINDS)}")
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _err(where, f"unknown kind {kind!r}{hint}; the kinds are {', '.join(KINDS)}")
    name = raw.get("name", kind)
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(where, f"name must be 1 to 64 letters, digits, spaces or _ - . (no '/'), not {name!r}")
    where = f"reward {name!r}" if "name" in raw else f"reward {i + 1} ({kind})"
    weight = _number(raw.get("weight", 1.0))
    if weight is None:
        raise _err(where, f"weight must be a finite number (e.g. 1.0; 0 only watches it), not {raw.get('weight')!r}")
    table = SETTINGS[kind]
    given = {k: v for k, v in raw.items() if k not in ("kind", "name", "weight")}
    unknown = sorted(set(given) - set(table))
    if unknown:
        takes = ", ".join(table) or "no settings"
        raise _err(where, f"unknown setting(s) {', '.join(map(repr, unknown))} for {kind}; it takes: {takes}")
    params: dict[str, Any] = {}
    for key, (check, default) in table.items():
        if key in given and given[key] is not None:
            params[key] = check(where, key, given[key])
        elif default is _REQUIRED:
            raise _err(where, f"{kind} needs '{key}': {_HINTS.get(kind, key)}")
        else:
            params[key] = default
    if kind == "json_schema":
        params.update(_check_schema(where, params["schema"]))
    elif kind == "length":
        _check_length(where, params)
    elif kind == "python":
        params["path"] = _check_python(where, params["path"], params["function"])
    return RewardSpec(kind=kind, name=name, weight=weight, params=params)


def _unique_names(specs: list[RewardSpec], explicit: set[str]) -> list[RewardSpec]:
    """Default names (the kind) made unique: ``regex``, ``regex_2``...; names given by the person are kept."""
    taken = set(explicit)
    out = []
    for spec in specs:
        if spec.name in explicit:
            out.append(spec)
            continue
        name, n = spec.name, 1
        while name in taken:
            n += 1
            name = f"{spec.name}_{n}"
        taken.add(name)
        out.append(RewardSpec(kind=spec.kind, name=name, weight=spec.weight, params=spec.params))
    return out


def _check_schema(where: str, value: Any) -> dict[str, Any]:
    path = ""
    schema = value
    if isinstance(value, str):
        file = Path(value).expanduser()
        if not file.is_file():
            raise _err(where, f"schema file not found: {file}")
        try:
            schema = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _err(where, f"cannot read the schema file {file} as JSON: {exc}") from None
        path = str(file.resolve())
    if not isinstance(schema, (Mapping, bool)):
        raise _err(where, f"schema must be a JSON Schema (a mapping) or the path of a .json file, not {value!r}")
    import jsonschema  # a pure-Python dependency; loaded only when a schema is used

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        raise _err(where, f"the schema is not a valid JSON Schema{f' at {at}' if at else ''}: {exc.message}") from None
    return {"schema": schema, "schema_path": path}


def _check_length(where: str, params: dict[str, Any]) -> None:
    tokens = params["min_tokens"] is not None or params["max_tokens"] is not None
    chars = params["min_chars"] is not None or params["max_chars"] is not None
    if tokens and chars:
        raise _err(
            where, "count in tokens or in characters, not both: use min_tokens/max_tokens or min_chars/max_chars"
        )
    if not tokens and not chars:
        raise _err(where, "length needs at least one bound: min_tokens, max_tokens, min_chars or max_chars")
    unit = "tokens" if tokens else "chars"
    low, high = params[f"min_{unit}"], params[f"max_{unit}"]
    if low is not None and high is not None and low > high:
        raise _err(where, f"min_{unit} ({low}) is above max_{unit} ({high})")
    if high == 0:
        raise _err(where, f"max_{unit} must be at least 1")


def _check_python(where: str, path: str, function: str) -> str:
    """The file's absolute path, once it is known to define ``function`` at its top level (read, never run)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise _err(where, f"the reward file {file} was not found; give the path of a .py file")
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except (OSError, UnicodeDecodeError) as exc:
        raise _err(where, f"cannot read the reward file {file}: {exc}") from None
    except SyntaxError as exc:
        raise _err(where, f"{file.name} line {exc.lineno}: {exc.msg}; fix the Python syntax") from None
    defined = _top_level_names(tree)
    if function not in defined:
        functions = sorted(n for n, is_def in defined.items() if is_def)
        found = f"it defines {', '.join(functions)}" if functions else "it defines no functions"
        raise _err(
            where,
            f"{file.name} has no top-level function {function!r} ({found}); define "
            f"`def {function}(prompts, completions, **kwargs)` or set 'function' to the one to use",
        )
    return str(file.resolve())


def _top_level_names(tree: ast.Module) -> dict[str, bool]:
    """Names bound at a module's top level, True for ``def``s (assignments and imports may also bind a callable)."""
    names: dict[str, bool] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = True
        elif isinstance(node, ast.ClassDef):
            names.setdefault(node.name, False)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.setdefault(target.id, False)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.setdefault((alias.asname or alias.name).split(".")[0], False)
    return names
