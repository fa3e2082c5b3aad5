"""The one internal form every dataset is normalised into.

SFT rows become a :class:`Conversation`; preference rows a :class:`PreferencePair`
whose ``prompt`` is the shared conversation and whose ``chosen`` / ``rejected``
are the assistant turns that differ; unpaired preference rows an
:class:`UnpairedExample`; plain text rows a :class:`TextExample`.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune_studio.core.protocol.dataset_report import Problem  # the report's own type: one definition

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    # Tool calls made by an assistant turn, as the chat template expects them (OpenAI form).
    tool_calls: tuple = ()
    # SFT: whether this turn is trained on (assistant turns by default).
    train: bool | None = None

    def to_dict(self) -> dict:
        out: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = list(self.tool_calls)
        return out


@dataclass(frozen=True)
class Conversation:
    """An SFT example: system/user/assistant/tool turns."""

    messages: tuple[Message, ...]
    tools: tuple = ()  # tool (function) schemas offered to the model
    source_line: int | None = None
    # The row's columns holding one plain value each (text, a number, true/false), as (name, value) pairs: what an
    # online RL objective hands its rewards beside the answers (a reference answer, a test case's expected value).
    columns: tuple[tuple[str, str | int | float | bool], ...] = ()

    kind = "sft"

    @property
    def prompt_key(self) -> str:
        """What identifies the prompt, for splitting by prompt: every turn before the last assistant turn."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=len(self.messages))
        return "\x1e".join(f"{m.role}\x1f{m.content}" for m in self.messages[:last])


@dataclass(frozen=True)
class PreferencePair:
    """A DPO example: the shared prompt turns, then the chosen and the rejected continuation."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    tools: tuple = ()
    source_line: int | None = None

    kind = "preference"

    @property
    def prompt_key(self) -> str:
        return "\x1e".join(f"{m.role}\x1f{m.content}" for m in self.prompt)


@dataclass(frozen=True)
class UnpairedExample:
    """A KTO-style example: one completion with a desirable/undesirable label."""

    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    label: bool
    source_line: int | None = None

    kind = "unpaired"

    @property
    def prompt_key(self) -> str:
        return "\x1e".join(f"{m.role}\x1f{m.content}" for m in self.prompt)


@dataclass(frozen=True)
class TextExample:
    """Plain text for continued pre-training: every token is trained on."""

    text: str
    source_line: int | None = None

    kind = "text"

    @property
    def prompt_key(self) -> str:
        return self.text


Example = Conversation | PreferencePair | UnpairedExample | TextExample


@dataclass
class LoadedDataset:
    """Examples in internal form, the detected format, and everything that went wrong on the way."""

    format: str
    kind: str  # "sft" | "preference" | "unpaired" | "text"
    examples: list
    problems: list[Problem] = field(default_factory=list)
    path: str = ""
    rows_read: int = 0  # rows found in the file, usable or not
    dropped: dict[str, int] = field(default_factory=dict)  # why rows were left out -> how many


class DatasetError(ValueError):
    """The file cannot be used at all (missing, empty, binary, not a table...). The message says why.

    ``problems`` carries the per-row problems found before giving up (e.g. every row malformed).
    """

    def __init__(self, message: str, problems: list[Problem] | tuple = ()):
        super().__init__(message)
        self.problems = list(problems)


def _messages(msgs) -> list[dict]:
    out = []
    for m in msgs:
        d = m.to_dict()
        if m.train is not None:
            d["train"] = m.train
        out.append(d)
    return out


def example_to_dict(example) -> dict:
    """A JSON-ready view of any example in internal form (for previews, duplicate checks and debugging)."""
    if isinstance(example, Conversation):
        out: dict = {"messages": _messages(example.messages)}
    elif isinstance(example, PreferencePair):
        out = {
            "prompt": _messages(example.prompt),
            "chosen": _messages(example.chosen),
            "rejected": _messages(example.rejected),
        }
    elif isinstance(example, UnpairedExample):
        out = {"prompt": _messages(example.prompt), "completion": _messages(example.completion), "label": example.label}
    elif isinstance(example, TextExample):
        return {"text": example.text}
    else:
        raise TypeError(f"not an example: {type(example).__name__}")
    if getattr(example, "tools", ()):
        out["tools"] = list(example.tools)
    return out
