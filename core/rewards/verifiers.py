"""The built-in reward functions (verifiers), each built from a checked :class:`RewardSpec`.

Every verifier follows TRL's contract, ``fn(prompts=[...], completions=[...], **columns) -> list[float]``, reads
completions as text or chat messages (``text.completion_text``) and scores each in [0, 1]:

- ``json_valid``: 1 when the answer (surrounding whitespace aside) is one JSON value, else 0. NaN and Infinity,
  which Python's reader would take, are not JSON and score 0.
- ``json_schema``: 1 when the answer is JSON that the schema accepts (``jsonschema``, the schema's own draft;
  ``format`` is not asserted), else 0.
- ``exact_match``: 1 when the answer, surrounding whitespace aside, equals the reference in ``column`` (a list of
  references: any of them), else 0. ``normalize``: compared after Unicode NFKC, case folding and collapsing runs of
  whitespace. ``json``: the answer and the reference are compared as JSON values (a reference given as text is
  read as JSON first; key order and spacing do not matter, 1 and true differ).
- ``token_f1``: the harmonic mean of token precision and recall against the reference (SQuAD's F1 on case-folded
  word tokens, ``\\w+``; the best over a list of references); 1 when both are empty.
- ``regex``: 1 when ``pattern`` is found in the answer (``full``: matches the whole answer, surrounding
  whitespace aside), else 0. Python's ``re``; use ``(?i)``, ``(?s)`` in the pattern for flags.
- ``length``: 1 inside [min, max] (in tokens or characters); outside it ``soft`` gives min/n below and max/n above
  (so shorter-than-wanted and longer-than-wanted answers still get a gradient), else 0. Tokens are counted with the
  ``count_tokens`` the engine passes (the model's tokenizer); without one, words and punctuation marks are counted
  (``\\w+|[^\\w\\s]``), which is close to but not the model's count.
- ``contains``: the share of the ``text`` strings found in the answer (1 for a single string found).
  ``not_contains``: 1 minus that share (0 for a single forbidden string found).
- ``think_answer``: 1 when the whole completion, surrounding whitespace aside, is ``<think>`` REASONING
  ``</think>`` ANSWER: REASONING not blank, ANSWER not blank, neither holding another ``<think>`` or ``</think>``,
  nothing before ``<think>``; with ``answer_tag``, ANSWER must be ``<answer>`` TEXT ``</answer>`` with TEXT not
  blank and nothing after it. Else 0.
- ``json_fields``: the share of the reference object's fields (in ``column``) the answer has right, or 1 / 0 with
  ``partial`` off; see ``core.rewards.json_fields``.

``after_think`` (on the content kinds) checks only the answer part of a thinking-then-answer completion: the text
after the last ``</think>``, without an ``<answer>`` wrapper (``text.after_think``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from finetune_studio.core.rewards import json_fields
from finetune_studio.core.rewards.base import RewardError, RewardFn
from finetune_studio.core.rewards.spec import RewardSpec
from finetune_studio.core.rewards.text import THINK_CLOSE, THINK_OPEN, after_think, completion_text

CountTokens = Callable[[str], int]
_WORDS = re.compile(r"\w+|[^\w\s]")
_THINK = re.compile(r"<think>(?P<reasoning>.*?)</think>(?P<answer>.*)", re.DOTALL)
_ANSWER = re.compile(r"\s*<answer>(?P<text>.*?)</answer>", re.DOTALL)


def build(spec: RewardSpec, count_tokens: CountTokens | None = None) -> RewardFn:
    """The reward function for a built-in ``spec`` (not ``python`` or ``reward_model``: those run elsewhere)."""
    makers: dict[str, Callable[[RewardSpec], Callable[[str, int, dict[str, Sequence[Any]]], float]]] = {
        "json_valid": _json_valid,
        "json_schema": _json_schema,
        "exact_match": _exact_match,
        "token_f1": _token_f1,
        "regex": _regex,
        "contains": _contains,
        "not_contains": _contains,
        "think_answer": _think_answer,
        "json_fields": _json_fields,
    }
    if spec.kind == "length":
        one = _length(spec, count_tokens)
    elif spec.kind in makers:
        one = makers[spec.kind](spec)
    else:
        raise ValueError(f"{spec.kind!r} is not a built-in verifier")
    answer_only = bool(spec.params.get("after_think", False))
    column = spec.column

    def reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any) -> list[float]:
        if column is not None:
            values = columns.get(column)
            if values is None:
                have = ", ".join(sorted(columns)) or "none"
                raise RewardError(spec.name, f"needs the column {column!r}, which the data lacks (columns: {have})")
            if len(values) != len(completions):
                raise RewardError(
                    spec.name, f"column {column!r} has {len(values)} value(s) for {len(completions)} completion(s)"
                )
        scores = []
        for i, completion in enumerate(completions):
            try:
                text = completion_text(completion)
            except TypeError as exc:
                raise RewardError(spec.name, f"completion {i}: {exc}") from None
            scores.append(one(after_think(text) if answer_only else text, i, columns))
        return scores

    reward.__name__ = spec.name
    return reward


# --- one maker per kind: each returns a scorer of (answer text, row index, columns) -------------------------------
Scorer = Callable[[str, int, dict[str, Sequence[Any]]], float]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when ``text`` (surrounding whitespace aside) is one strict JSON value, else (False, None)."""
    try:
        return True, json.loads(text, parse_constant=_no_constants)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return False, None


def _json_valid(spec: RewardSpec) -> Scorer:
    return lambda text, i, columns: 1.0 if parse_json(text)[0] else 0.0


def _json_schema(spec: RewardSpec) -> Scorer:
    import jsonschema

    schema = spec.params["schema"]
    validator = jsonschema.validators.validator_for(schema)(schema)

    def score(text: str, i: int, columns: dict[str, Sequence[Any]]) -> float:
        ok, value = parse_json(text)
        return 1.0 if ok and validator.is_valid(value) else 0.0

    return score


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _references(spec: RewardSpec, value: Any, i: int, as_json: bool) -> list[Any]:
    """The acceptable references of row ``i``: text (or, with ``as_json``, JSON values)."""
    if value is None:
        raise RewardError(spec.name, f"row {i} has no reference in column {spec.column!r}; fill it or drop the row")
    if as_json:
        if isinstance(value, str):
            ok, parsed = parse_json(value)
            if not ok:
                raise RewardError(
                    spec.name, f"row {i}: the reference {value[:80]!r} is not JSON; turn 'json' off or fix it"
                )
            return [parsed]
        return [value]
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(str(item))
        else:
            raise RewardError(
                spec.name,
                f"row {i}: the reference in column {spec.column!r} is {type(item).__name__}, not text "
                "(set 'json': true to compare JSON values)",
            )
    return out


def json_equal(a: Any, b: Any) -> bool:
    """JSON values equal as JSON: objects by keys, arrays in order, true differs from 1, 1 equals 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and bool(a == b)


def _exact_match(spec: RewardSpec) -> Scorer:
    column = str(spec.column)
    as_json = bool(spec.params["json"])
    normalize = bool(spec.params["normalize"])

    def score(text: str, i: int, columns: dict[str, Sequence[Any]]) -> float:
        refs = _references(spec, columns[column][i], i, as_json)
        if as_json:
            ok, value = parse_json(text)
            return 1.0 if ok and any(json_equal(value, ref) for ref in refs) else 0.0
        if normalize:
            return 1.0 if _normal(text) in {_normal(r) for r in refs} else 0.0
        return 1.0 if text.strip() in {r.strip() for r in refs} else 0.0

    return score


def f1(answer: str, reference: str) -> float:
    """SQuAD-style token F1 on case-folded word tokens."""
    a = re.findall(r"\w+", unicodedata.normalize("NFKC", answer).casefold())
    r = re.findall(r"\w+", unicodedata.normalize("NFKC", reference).casefold())
    if not a or not r:
        return 1.0 if not a and not r else 0.0
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _token_f1(spec: RewardSpec) -> Scorer:
    column = str(spec.column)
    return lambda text, i, columns: max(f1(text, ref) for ref in _references(spec, columns[column][i], i, False))


def _regex(spec: RewardSpec) -> Scorer:
    pattern = re.compile(spec.params["pattern"])
    if spec.params["full"]:
        return lambda text, i, columns: 1.0 if pattern.fullmatch(text.strip()) else 0.0
    return lambda text, i, columns: 1.0 if pattern.search(text) else 0.0


def _length(spec: RewardSpec, count_tokens: CountTokens | None) -> Scorer:
    tokens = spec.params["min_tokens"] is not None or spec.params["max_tokens"] is not None
    unit = "tokens" if tokens else "chars"
    low, high = spec.params[f"min_{unit}"], spec.params[f"max_{unit}"]
    soft = bool(spec.params["soft"])
    if not tokens:
        count: CountTokens = len
    elif count_tokens is not None:
        count = count_tokens
    else:
        count = lambda text: len(_WORDS.findall(text))

    def score(text: str, i: int, columns: dict[str, Sequence[Any]]) -> float:
        n = count(text)
        if low is not None and n < low:
            return n / low if soft else 0.0
        if high is not None and n > high:
            return high / n if soft else 0.0
        return 1.0

    return score


def _contains(spec: RewardSpec) -> Scorer:
    fold = bool(spec.params["ignore_case"])
    needles = [t.casefold() if fold else t for t in spec.params["text"]]
    negate = spec.kind == "not_contains"

    def score(text: str, i: int, columns: dict[str, Sequence[Any]]) -> float:
        hay = text.casefold() if fold else text
        share = sum(1 for n in needles if n in hay) / len(needles)
        return 1.0 - share if negate else share

    return score


def think_answer_ok(text: str, answer_tag: bool = False) -> bool:
    """True when ``text`` is in the thinking-then-answer format (see the module's docstring)."""
    match = _THINK.fullmatch(text.strip())
    if match is None:
        return False
    reasoning, answer = match.group("reasoning"), match.group("answer")
    if THINK_OPEN in reasoning or THINK_OPEN in answer or THINK_CLOSE in answer:
        return False
    if not reasoning.strip() or not answer.strip():
        return False
    if answer_tag:
        inner = _ANSWER.fullmatch(answer.rstrip())
        return inner is not None and bool(inner.group("text").strip()) and "<answer>" not in inner.group("text")
    return True


def _json_fields(spec: RewardSpec) -> Scorer:
    return json_fields.make(spec)


def _think_answer(spec: RewardSpec) -> Scorer:
    answer_tag = bool(spec.params["answer_tag"])
    return lambda text, i, columns: 1.0 if think_answer_ok(text, answer_tag) else 0.0
