"""Row layouts: detecting which one a row is in, and normalising it into the internal form.

SFT: ``alpaca``, ``sharegpt``, ``messages`` (OpenAI), ``prompt-completion``; ``text`` for continued pre-training.
Preference: ``trl`` (prompt/chosen/rejected strings), ``trl-implicit`` (chosen/rejected strings only),
``trl-conversational`` and ``trl-implicit-conversational`` (message lists), ``hh`` (Anthropic HH transcripts),
``ultrafeedback`` (prompt + message lists + scores), ``alpaca-ranking`` and ``sharegpt-ranking`` (LLaMA-Factory),
``chosen-rejected-messages`` (a full message list per side).
Unpaired preference (KTO): ``kto`` (prompt/completion/label), ``messages-kto`` and ``sharegpt-kto`` (a
conversation plus a boolean label; LLaMA-Factory calls the label ``kto_tag``).

Every normaliser takes the row (already renamed by the user's mapping), the mapping, the source line and a
``warn(message, kind)`` callback; it returns an example or raises :class:`RowError` saying why the row is unusable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from finetune_studio.engine.datasets.messages import (
    Mapping,
    maybe_json,
    parse_message,
    parse_messages,
    parse_tools,
    without_train_flags,
)
from finetune_studio.engine.datasets.preference import (
    is_hh_transcript,
    parse_hh,
    split_implicit_text,
    split_shared_prefix,
)
from finetune_studio.engine.datasets.problems import RowError
from finetune_studio.engine.datasets.schema import Conversation, Message, PreferencePair, TextExample, UnpairedExample

Warn = Callable[[str, str], None]


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "sft" | "preference" | "unpaired" | "text"
    normalise: Callable  # (row, mapping, line, warn) -> example


def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _turns(value):
    """A list of turn objects, also when stored as JSON text; other values unchanged."""
    if isinstance(value, str):
        decoded = maybe_json(value)
        if isinstance(decoded, list) and decoded and all(isinstance(t, dict) for t in decoded):
            return decoded
    return value


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"'{key}' must be text, found {type(value).__name__}", f"rows whose '{key}' is not text")
    return str(value)


def _required(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"missing '{key}'", f"rows without '{key}'")
    text = _text(row, key)
    if not text.strip():
        raise RowError(f"empty '{key}'", f"rows with an empty '{key}'")
    return text


def _label(row: dict) -> bool:
    value = row.get("label", row.get("kto_tag"))
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RowError(f"'label' must be true or false, found {value!r}", "rows whose 'label' is not true/false")


def _with_system(row: dict, msgs: tuple[Message, ...]) -> tuple[Message, ...]:
    system = _text(row, "system")
    if system.strip() and not (msgs and msgs[0].role == "system"):
        return (Message("system", system),) + msgs
    return msgs


def _check_trainable(msgs: tuple[Message, ...], warn: Warn) -> None:
    answers = [m for m in msgs if m.role == "assistant"]
    if not answers:
        raise RowError("no assistant turn to train on", "conversations without an assistant turn")
    if all(m.train is False for m in answers):
        raise RowError("every assistant turn has weight 0: nothing to train on", "conversations with nothing to train")
    empty = sum(1 for m in answers if not m.content.strip() and not m.tool_calls)
    if empty == len(answers):
        raise RowError("every assistant turn is empty", "conversations whose answers are all empty")
    if empty:
        warn(f"{empty} empty assistant turn(s)", "conversations with some empty assistant turns")


def _prompt(value, name: str, mapping: Mapping) -> tuple[Message, ...]:
    """A prompt given as a string (one user turn) or as a list of turns."""
    value = _turns(value)
    if isinstance(value, list):
        return parse_messages(value, mapping, name)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"empty '{name}'", f"rows with an empty '{name}'")
    return (Message("user", value),)


def _answer(value, name: str, mapping: Mapping) -> tuple[Message, ...]:
    """An answer given as a string (one assistant turn), a turn object or a list of turns."""
    value = _turns(value)
    if isinstance(value, dict):
        return (parse_message(value, mapping, name),)
    if isinstance(value, list):
        return parse_messages(value, mapping, name)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"empty '{name}'", f"rows with an empty '{name}'")
    return (Message("assistant", value),)


# --- SFT ----------------------------------------------------------------------------------------------------------


def _alpaca_prompt(row: dict) -> tuple[Message, ...]:
    msgs: list[Message] = []
    history = maybe_json(row.get("history")) or []
    if not isinstance(history, list):
        raise RowError("'history' must be a list of [question, answer] pairs", "rows with a malformed 'history'")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RowError("'history' must be a list of [question, answer] pairs", "rows with a malformed 'history'")
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = "\n".join(t for t in (_text(row, "instruction"), _text(row, "input")) if t.strip())
    if not user:
        raise RowError("empty 'instruction' and 'input'", "rows with an empty 'instruction'")
    return _with_system(row, tuple(msgs) + (Message("user", user),))


def alpaca(row, mapping, line, warn):
    return Conversation(_alpaca_prompt(row) + (Message("assistant", _required(row, "output")),), source_line=line)


def _chat(key: str):
    def normalise(row, mapping, line, warn):
        msgs = _with_system(row, parse_messages(row.get(key), mapping, key))
        _check_trainable(msgs, warn)
        return Conversation(msgs, parse_tools(row.get("tools")), source_line=line)

    return normalise


def prompt_completion(row, mapping, line, warn):
    prompt = _with_system(row, _prompt(row.get("prompt"), "prompt", mapping))
    # Only the completion is trained on, as in TRL: assistant turns inside the prompt are context.
    prompt = tuple(Message(m.role, m.content, m.tool_calls, False) if m.role == "assistant" else m for m in prompt)
    msgs = prompt + _answer(row.get("completion"), "completion", mapping)
    _check_trainable(msgs, warn)
    return Conversation(msgs, parse_tools(row.get("tools")), source_line=line)


def text(row, mapping, line, warn):
    return TextExample(_required(row, "text"), source_line=line)


# --- preference ---------------------------------------------------------------------------------------------------


def _pair(prompt, chosen, rejected, row, line) -> PreferencePair:
    return PreferencePair(
        without_train_flags(prompt),
        without_train_flags(chosen),
        without_train_flags(rejected),
        parse_tools(row.get("tools")),
        source_line=line,
    )


def trl(row, mapping, line, warn):
    prompt = _with_system(row, _prompt(row.get("prompt"), "prompt", mapping))
    return _pair(
        prompt,
        _answer(row.get("chosen"), "chosen", mapping),
        _answer(row.get("rejected"), "rejected", mapping),
        row,
        line,
    )


def trl_conversational(row, mapping, line, warn):
    chosen = _answer(row.get("chosen"), "chosen", mapping)
    rejected = _answer(row.get("rejected"), "rejected", mapping)
    if chosen[0].role != "assistant" and rejected[0].role != "assistant":
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)  # the answers repeat the prompt
    else:
        prompt = _with_system(row, _prompt(row.get("prompt"), "prompt", mapping))
    return _pair(prompt, chosen, rejected, row, line)


def ultrafeedback(row, mapping, line, warn):
    pair = trl_conversational(row, mapping, line, warn)
    try:
        good, bad = float(row.get("score_chosen")), float(row.get("score_rejected"))
    except (TypeError, ValueError):
        return pair
    if good < bad:
        warn(f"score_chosen {good:g} is below score_rejected {bad:g}", "pairs whose chosen scores lower")
    elif good == bad:
        warn(f"chosen and rejected have the same score ({good:g})", "pairs with tied scores")
    return pair


def trl_implicit(row, mapping, line, warn):
    prompt, chosen, rejected = split_implicit_text(_required(row, "chosen"), _required(row, "rejected"))
    return _pair(
        (Message("user", prompt.rstrip()),),
        (Message("assistant", chosen),),
        (Message("assistant", rejected),),
        row,
        line,
    )


def trl_implicit_conversational(row, mapping, line, warn):
    prompt, chosen, rejected = split_shared_prefix(
        parse_messages(row.get("chosen"), mapping, "chosen"), parse_messages(row.get("rejected"), mapping, "rejected")
    )
    return _pair(prompt, chosen, rejected, row, line)


def hh(row, mapping, line, warn):
    prompt, chosen, rejected = split_shared_prefix(
        parse_hh(_required(row, "chosen")), parse_hh(_required(row, "rejected"))
    )
    return _pair(prompt, chosen, rejected, row, line)


def alpaca_ranking(row, mapping, line, warn):
    return _pair(
        _alpaca_prompt(row),
        _answer(row.get("chosen"), "chosen", mapping),
        _answer(row.get("rejected"), "rejected", mapping),
        row,
        line,
    )


def sharegpt_ranking(row, mapping, line, warn):
    prompt = _with_system(row, parse_messages(row.get("conversations"), mapping, "conversations"))
    if prompt[-1].role == "assistant":
        raise RowError(
            "'conversations' must end with the user's turn before chosen/rejected",
            "ranking rows whose conversation ends with an answer",
        )
    return _pair(
        prompt,
        _answer(row.get("chosen"), "chosen", mapping),
        _answer(row.get("rejected"), "rejected", mapping),
        row,
        line,
    )


def chosen_rejected_messages(row, mapping, line, warn):
    prompt, chosen, rejected = split_shared_prefix(
        parse_messages(row.get("chosen_messages"), mapping, "chosen_messages"),
        parse_messages(row.get("rejected_messages"), mapping, "rejected_messages"),
    )
    return _pair(prompt, chosen, rejected, row, line)


# --- unpaired preference (KTO) ------------------------------------------------------------------------------------


def kto(row, mapping, line, warn):
    prompt = _with_system(row, _prompt(row.get("prompt"), "prompt", mapping))
    completion = _answer(row.get("completion"), "completion", mapping)
    return UnpairedExample(without_train_flags(prompt), without_train_flags(completion), _label(row), line)


def _chat_kto(key: str):
    def normalise(row, mapping, line, warn):
        msgs = _with_system(row, parse_messages(row.get(key), mapping, key))
        cut = max((i + 1 for i, m in enumerate(msgs) if m.role != "assistant"), default=0)
        if cut == 0 or cut == len(msgs):
            raise RowError(
                f"'{key}' must be a prompt followed by an assistant answer",
                "labelled conversations without a prompt and an answer",
            )
        return UnpairedExample(without_train_flags(msgs[:cut]), without_train_flags(msgs[cut:]), _label(row), line)

    return normalise


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("alpaca", "sft", alpaca),
        Format("sharegpt", "sft", _chat("conversations")),
        Format("messages", "sft", _chat("messages")),
        Format("prompt-completion", "sft", prompt_completion),
        Format("text", "text", text),
        Format("trl", "preference", trl),
        Format("trl-implicit", "preference", trl_implicit),
        Format("trl-conversational", "preference", trl_conversational),
        Format("trl-implicit-conversational", "preference", trl_implicit_conversational),
        Format("hh", "preference", hh),
        Format("ultrafeedback", "preference", ultrafeedback),
        Format("alpaca-ranking", "preference", alpaca_ranking),
        Format("sharegpt-ranking", "preference", sharegpt_ranking),
        Format("chosen-rejected-messages", "preference", chosen_rejected_messages),
        Format("kto", "unpaired", kto),
        Format("messages-kto", "unpaired", _chat_kto("messages")),
        Format("sharegpt-kto", "unpaired", _chat_kto("conversations")),
    )
}


def detect(row: dict) -> str | None:
    """The name of the layout ``row`` is in, or None when it matches none."""
    if _has(row, "chosen_messages") and _has(row, "rejected_messages"):
        return "chosen-rejected-messages"
    if _has(row, "chosen") and _has(row, "rejected"):
        chosen, rejected = _turns(row["chosen"]), _turns(row["rejected"])
        if _has(row, "conversations"):
            return "sharegpt-ranking"
        if _has(row, "instruction"):
            return "alpaca-ranking"
        if _has(row, "prompt"):
            if isinstance(chosen, list) or isinstance(rejected, list):
                scored = _has(row, "score_chosen") or _has(row, "score_rejected")
                return "ultrafeedback" if scored else "trl-conversational"
            return "trl"
        if isinstance(chosen, list):
            return "trl-implicit-conversational"
        if is_hh_transcript(chosen) and is_hh_transcript(rejected):
            return "hh"
        return "trl-implicit"
    labelled = _has(row, "label") or _has(row, "kto_tag")
    if labelled and _has(row, "prompt") and _has(row, "completion"):
        return "kto"
    if labelled and _has(row, "messages"):
        return "messages-kto"
    if labelled and _has(row, "conversations"):
        return "sharegpt-kto"
    for key, name in (("messages", "messages"), ("conversations", "sharegpt")):
        if _has(row, key):
            return name
    if _has(row, "instruction") and _has(row, "output"):
        return "alpaca"
    if _has(row, "prompt") and _has(row, "completion"):
        return "prompt-completion"
    if _has(row, "text"):
        return "text"
    return None


def describe_columns(rows: list[dict]) -> str:
    """The columns seen in ``rows``, for error messages."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return ", ".join(json.dumps(c) for c in list(seen)[:20]) or "(none)"
