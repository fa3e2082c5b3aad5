"""Bounding the work per row: text far longer than ``max_length`` tokens is cut before it is tokenised.

Training keeps at most ``max_length`` tokens of an example, so tokenising a 100 MB row whole only to throw away all
but its first few hundred tokens costs gigabytes for nothing. :func:`cut_example` cuts every text to
:func:`char_budget` characters first, a bound generous enough that the kept tokens are the same: a token spans
about 4 characters of prose and rarely more than 16, and the budget allows ``CHARS_PER_TOKEN`` per token.

What is kept is what truncation would keep: the start of an SFT conversation, of a text and of an answer; the end
of a preference or unpaired prompt (``engine.datasets.render`` keeps a prompt's end). Pure Python: no tokenizer needed.
"""

from __future__ import annotations

import dataclasses

from finetune_studio.engine.datasets.schema import (
    Conversation,
    Message,
    PreferencePair,
    TextExample,
    UnpairedExample,
)

CHARS_PER_TOKEN = 32  # generous: prose averages ~4 characters per token, code and numbers fewer
MIN_BUDGET = 4096


def char_budget(max_length: int) -> int:
    """Characters of one example's text worth tokenising for ``max_length`` tokens."""
    return max(MIN_BUDGET, max_length * CHARS_PER_TOKEN)


def _keep_start(msgs: tuple[Message, ...], budget: int) -> tuple[tuple[Message, ...], int]:
    """Messages whose contents together keep at most ``budget`` characters, from the first one on."""
    out, left, cut = [], budget, 0
    for m in msgs:
        if len(m.content) > left:
            cut += len(m.content) - left
            m = dataclasses.replace(m, content=m.content[:left])
        left -= len(m.content)
        out.append(m)
    return tuple(out), cut


def _keep_end(msgs: tuple[Message, ...], budget: int) -> tuple[tuple[Message, ...], int]:
    """The same, counting from the last message back (a prompt's end is what truncation keeps)."""
    kept, cut = _keep_start(tuple(dataclasses.replace(m, content=m.content[::-1]) for m in reversed(msgs)), budget)
    return tuple(dataclasses.replace(m, content=m.content[::-1]) for m in reversed(kept)), cut


def _total(msgs) -> int:
    return sum(len(m.content) for m in msgs)


def cut_example(example, budget: int):
    """``(example, characters cut)``: ``example`` with its text cut to ``budget`` characters per part (the
    conversation, the prompt, each answer); the same object when nothing is over."""
    if isinstance(example, TextExample):
        if len(example.text) <= budget:
            return example, 0
        return dataclasses.replace(example, text=example.text[:budget]), len(example.text) - budget
    if isinstance(example, Conversation):
        if _total(example.messages) <= budget:
            return example, 0
        messages, cut = _keep_start(example.messages, budget)
        return dataclasses.replace(example, messages=messages), cut
    if isinstance(example, PreferencePair):
        if max(_total(example.prompt), _total(example.chosen), _total(example.rejected)) <= budget:
            return example, 0
        prompt, a = _keep_end(example.prompt, budget)
        chosen, b = _keep_start(example.chosen, budget)
        rejected, c = _keep_start(example.rejected, budget)
        return dataclasses.replace(example, prompt=prompt, chosen=chosen, rejected=rejected), a + b + c
    if isinstance(example, UnpairedExample):
        if max(_total(example.prompt), _total(example.completion)) <= budget:
            return example, 0
        prompt, a = _keep_end(example.prompt, budget)
        completion, b = _keep_start(example.completion, budget)
        return dataclasses.replace(example, prompt=prompt, completion=completion), a + b
    return example, 0
