"""Minimal first reader: JSONL of OpenAI ``messages`` (SFT) or TRL ``prompt``/``chosen``/``rejected`` (DPO).

The full range of formats replaces this module's internals behind the same ``load_dataset`` API.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.datasets.schema import (
    Conversation,
    DatasetError,
    LoadedDataset,
    Message,
    PreferencePair,
    Problem,
)


def load_dataset(path: str | Path, mapping: dict | None = None) -> LoadedDataset:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    examples, problems, fmt = [], [], None
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(f"not valid JSON ({exc.msg})", lineno, str(path)))
                continue
            if "messages" in row:
                fmt = fmt or "messages"
                msgs = tuple(Message(m["role"], m["content"]) for m in row["messages"])
                examples.append(Conversation(msgs, source_line=lineno))
            elif {"prompt", "chosen", "rejected"} <= set(row):
                fmt = fmt or "trl"
                examples.append(PreferencePair(
                    (Message("user", row["prompt"]),), (Message("assistant", row["chosen"]),),
                    (Message("assistant", row["rejected"]),), source_line=lineno))
            else:
                problems.append(Problem("unrecognised row", lineno, str(path)))
    if not examples:
        raise DatasetError(f"{path.name}: no usable rows")
    kind = "sft" if fmt == "messages" else "preference"
    return LoadedDataset(format=fmt, kind=kind, examples=examples, problems=problems, path=str(path))
