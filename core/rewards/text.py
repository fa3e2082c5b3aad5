"""A completion's text, whether it comes as a string or as chat messages (TRL allows both)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# The thinking-then-answer format: ``<think>`` reasoning ``</think>`` then the answer. See ``verifiers.think_answer``.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is, or the assistant messages' contents joined.

    A chat-style completion is a list of ``{"role": ..., "content": ...}`` messages (TRL's conversational form);
    only assistant messages count (all messages when none has a role). A message's content may be a string or a
    list of parts of which the ``{"type": "text", "text": ...}`` ones are read. Raises ``TypeError`` otherwise.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and all(isinstance(m, Mapping) for m in completion):
        roles = [m.get("role") for m in completion]
        chosen = [m for m in completion if m.get("role") == "assistant"] if "assistant" in roles else list(completion)
        return "".join(_content_text(m.get("content")) for m in chosen)
    raise TypeError(
        f"a completion must be text or a list of chat messages ({{'role': 'assistant', 'content': ...}}), "
        f"not {type(completion).__name__}"
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(
            str(part.get("text", "")) if isinstance(part, Mapping) and part.get("type", "text") == "text" else ""
            for part in content
        )
    raise TypeError(f"a message's content must be text or a list of parts, not {type(content).__name__}")


def after_think(text: str) -> str:
    """The answer part of a thinking-then-answer completion: the text after the last ``</think>`` (all of ``text``
    when there is none), with an ``<answer>...</answer>`` wrapper taken off when the answer is exactly that."""
    _, sep, tail = text.rpartition(THINK_CLOSE)
    answer = tail if sep else text
    match = re.fullmatch(r"\s*<answer>(.*)</answer>\s*", answer, flags=re.DOTALL)
    return match.group(1) if match else answer
