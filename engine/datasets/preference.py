"""Finding the prompt of a preference pair when the data does not say it (TRL's "implicit prompt").

Two answers given in full (chosen and rejected, each with the prompt inside) share a prefix: that prefix is
the prompt. For message lists it is the shared run of messages, backed off so that the prompt ends before an
assistant turn. For plain strings it is the shared text up to the last assistant marker (``"\\n\\nAssistant:"``,
``"### Response:"`` ...) or else up to the last whitespace, so neither answer starts mid-word. Anthropic HH
transcripts are parsed into turns first.
"""

from __future__ import annotations

import re

from finetune_studio.engine.datasets.problems import RowError
from finetune_studio.engine.datasets.schema import Message

ASSISTANT_MARKERS = (
    "\n\nAssistant:",
    "### Response:",
    "<|im_start|>assistant\n",
    "[/INST]",
    "<|assistant|>",
    "\nAssistant:",
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def split_shared_prefix(chosen: tuple[Message, ...], rejected: tuple[Message, ...]):
    """(prompt, chosen answer, rejected answer) from two full conversations sharing their first turns.

    Identical conversations give identical answers (the last assistant turn); when one conversation is a prefix
    of the other, the prompt stops before the last shared assistant turn so both answers are non-empty.
    """
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if shared == len(chosen) == len(rejected) or shared == min(len(chosen), len(rejected)):
        # Identical, or one is a prefix of the other: the answers start at the last shared assistant turn.
        shared = max((i for i in range(shared) if chosen[i].role == "assistant"), default=0)
    while shared > 0 and chosen[shared - 1].role == "assistant":
        shared -= 1
    if shared == 0:
        raise RowError("chosen and rejected share no prompt turns", "pairs whose answers share no prompt")
    prompt, c, r = chosen[:shared], chosen[shared:], rejected[shared:]
    if c[0].role != "assistant" or r[0].role != "assistant":
        raise RowError(
            "chosen and rejected differ before the answer (in a user turn)", "pairs that differ in a user turn"
        )
    return prompt, c, r


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) from two strings that start with the same prompt."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    if n == len(chosen) == len(rejected) or n == min(len(chosen), len(rejected)):
        common = common[:-1]  # identical or a prefix: leave at least one character to each answer
    cut = max((common.rfind(m) + len(m) for m in ASSISTANT_MARKERS if m in common), default=-1)
    if cut < 0:
        cut = max((i + 1 for i, ch in enumerate(common) if ch.isspace()), default=0)
    prompt = chosen[:cut]
    if not prompt.strip():
        raise RowError(
            "chosen and rejected share no prompt text; add a 'prompt' column", "pairs whose answers share no prompt"
        )
    return prompt, chosen[cut:], rejected[cut:]


def is_hh_transcript(text) -> bool:
    """An Anthropic HH transcript: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``."""
    return isinstance(text, str) and "\n\nHuman:" in text and "\n\nAssistant:" in text


def parse_hh(text: str) -> tuple[Message, ...]:
    """An HH transcript as turns; text before the first ``Human:`` becomes a system turn."""
    pieces = _HH_TURN.split(text)
    head, rest = pieces[0], pieces[1:]
    msgs = [Message("system", head.strip())] if head.strip() else []
    for speaker, content in zip(rest[::2], rest[1::2]):
        msgs.append(Message("user" if speaker == "Human" else "assistant", content.strip()))
    if not msgs or msgs[-1].role != "assistant":
        raise RowError("the HH transcript does not end with an 'Assistant:' turn", "HH transcripts without an answer")
    return tuple(msgs)
