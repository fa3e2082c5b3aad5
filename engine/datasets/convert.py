"""Writing examples back out in a format other tools read, atomically.

Targets:
  ``trl``                 TRL standard, strings: ``prompt``/``completion`` (SFT), ``prompt``/``chosen``/``rejected``
                          (preference), ``prompt``/``completion``/``label`` (unpaired), ``text``. Single-turn only.
  ``trl-conversational``  TRL conversational: the same keys holding message lists; ``messages`` for SFT.
  ``messages``            OpenAI messages: ``messages`` (SFT, unpaired with ``label``), ``chosen_messages``/
                          ``rejected_messages`` (preference, the full conversation per side).
  ``llama-factory``       one JSON list in LLaMA-Factory's ShareGPT layout (``conversations`` of ``from``/``value``;
                          ``chosen``/``rejected`` objects for preference; ``kto_tag`` for unpaired).
JSON Lines for all but ``llama-factory``. A row the target cannot express raises :class:`RowError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune_studio.engine.datasets.problems import ProblemLog, RowError
from finetune_studio.engine.datasets.schema import DatasetError, Message, PreferencePair, TextExample, UnpairedExample

TARGETS = ("trl", "trl-conversational", "llama-factory", "messages")
_SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "tool": "observation"}


def _msgs(msgs: Iterable[Message]) -> list[dict]:
    out = []
    for m in msgs:
        d = m.to_dict()
        if m.train is not None:
            d["loss_weight"] = 1.0 if m.train else 0.0
        out.append(d)
    return out


def _single(msgs: tuple[Message, ...], role: str, what: str) -> str:
    if len(msgs) != 1 or msgs[0].role != role or msgs[0].tool_calls:
        raise RowError(
            f"{what} is not a single {role} turn: use --to trl-conversational",
            f"rows that are not single-turn ({what})",
        )
    return msgs[0].content


def _with_tools(out: dict, example) -> dict:
    if getattr(example, "tools", ()):
        out["tools"] = list(example.tools)
    return out


def to_trl(example) -> dict:
    if isinstance(example, TextExample):
        return {"text": example.text}
    if isinstance(example, PreferencePair):
        return {
            "prompt": _single(example.prompt, "user", "the prompt"),
            "chosen": _single(example.chosen, "assistant", "the chosen answer"),
            "rejected": _single(example.rejected, "assistant", "the rejected answer"),
        }
    if isinstance(example, UnpairedExample):
        return {
            "prompt": _single(example.prompt, "user", "the prompt"),
            "completion": _single(example.completion, "assistant", "the completion"),
            "label": example.label,
        }
    msgs = example.messages
    if len(msgs) != 2 or example.tools:
        raise RowError(
            "the conversation is not one user turn and one answer: use --to trl-conversational",
            "rows that are not single-turn (conversation)",
        )
    return {
        "prompt": _single(msgs[:1], "user", "the prompt"),
        "completion": _single(msgs[1:], "assistant", "the answer"),
    }


def to_trl_conversational(example) -> dict:
    if isinstance(example, TextExample):
        return {"text": example.text}
    if isinstance(example, PreferencePair):
        out: dict[str, Any] = {
            "prompt": _msgs(example.prompt),
            "chosen": _msgs(example.chosen),
            "rejected": _msgs(example.rejected),
        }
    elif isinstance(example, UnpairedExample):
        out = {"prompt": _msgs(example.prompt), "completion": _msgs(example.completion), "label": example.label}
    else:
        out = {"messages": _msgs(example.messages)}
    return _with_tools(out, example)


def to_messages(example) -> dict:
    if isinstance(example, TextExample):
        return {"text": example.text}
    if isinstance(example, PreferencePair):
        out: dict[str, Any] = {
            "chosen_messages": _msgs(example.prompt + example.chosen),
            "rejected_messages": _msgs(example.prompt + example.rejected),
        }
    elif isinstance(example, UnpairedExample):
        out = {"messages": _msgs(example.prompt + example.completion), "label": example.label}
    else:
        out = {"messages": _msgs(example.messages)}
    return _with_tools(out, example)


def _sharegpt_turn(m: Message) -> dict:
    if m.tool_calls:
        if m.content.strip():
            raise RowError(
                "an assistant turn has both text and tool calls, which ShareGPT cannot express",
                "turns with both text and tool calls",
            )
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m.tool_calls]
        return {
            "from": "function_call",
            "value": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False),
        }
    if m.role not in _SHAREGPT_ROLES:
        raise RowError(
            f"a '{m.role}' turn in the middle of the conversation, which ShareGPT cannot express",
            f"'{m.role}' turns after the start",
        )
    return {"from": _SHAREGPT_ROLES[m.role], "value": m.content}


def _sharegpt(msgs: tuple[Message, ...], out: dict) -> list[dict]:
    if msgs and msgs[0].role == "system":
        out["system"] = msgs[0].content
        msgs = msgs[1:]
    return [_sharegpt_turn(m) for m in msgs]


def to_llama_factory(example) -> dict:
    if isinstance(example, TextExample):
        return {"text": example.text}
    out: dict = {}
    if isinstance(example, PreferencePair):
        out["conversations"] = _sharegpt(example.prompt, out)
        out["chosen"] = _sharegpt_turn(_one_turn(example.chosen, "chosen"))
        out["rejected"] = _sharegpt_turn(_one_turn(example.rejected, "rejected"))
    elif isinstance(example, UnpairedExample):
        out["conversations"] = _sharegpt(example.prompt + example.completion, out)
        out["kto_tag"] = example.label
    else:
        out["conversations"] = _sharegpt(example.messages, out)
    if getattr(example, "tools", ()):
        out["tools"] = json.dumps([t.get("function", t) for t in example.tools], ensure_ascii=False)
    return out


def _one_turn(msgs: tuple[Message, ...], side: str) -> Message:
    if len(msgs) != 1:
        raise RowError(
            f"the {side} answer has {len(msgs)} turns; LLaMA-Factory ranking takes one", "answers of several turns"
        )
    return msgs[0]


CONVERTERS = {
    "trl": to_trl,
    "trl-conversational": to_trl_conversational,
    "messages": to_messages,
    "llama-factory": to_llama_factory,
}


def llama_factory_info(kind: str, file_name: str) -> dict:
    """The entry to add to LLaMA-Factory's ``data/dataset_info.json`` for a file written by this module."""
    entry: dict = {"file_name": file_name}
    if kind == "text":
        entry["columns"] = {"prompt": "text"}
        return entry
    entry["formatting"] = "sharegpt"
    entry["columns"] = {"messages": "conversations", "system": "system", "tools": "tools"}
    if kind == "preference":
        entry["ranking"] = True
        entry["columns"].update(chosen="chosen", rejected="rejected")
    if kind == "unpaired":
        entry["columns"]["kto_tag"] = "kto_tag"
    return entry


def write_examples(examples: Iterable, out: str | Path, target: str, log: ProblemLog) -> int:
    """Write ``examples`` to ``out`` in ``target`` form through a temporary file; returns the rows written.

    Rows the target cannot express are recorded in ``log`` and left out. The final name only ever holds a
    complete file: on any error the temporary file is removed and ``out`` is untouched.
    """
    if target not in CONVERTERS:
        raise ValueError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    convert = CONVERTERS[target]
    out = Path(out)
    # a fresh name in the target folder, created by this call alone (O_EXCL, never through a planted symlink)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    tmp = Path(tmp_name)
    as_list = target == "llama-factory"
    written = 0
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as fh:
            if as_list:
                fh.write("[")
            for ex in examples:
                try:
                    row = convert(ex)
                except RowError as exc:
                    log.drop(str(exc), ex.source_line, kind=exc.kind)
                    continue
                text = json.dumps(row, ensure_ascii=False)
                if as_list:
                    fh.write(("\n  " if not written else ",\n  ") + text)
                else:
                    fh.write(text + "\n")
                written += 1
            if not written:
                raise DatasetError(f"no row could be written as {target}: see the problems above")
            if as_list:
                fh.write("\n]\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written
