"""What the model says during training: greedy answers to a few fixed validation prompts at each evaluation."""

from __future__ import annotations

import torch

from finetune_studio.engine.datasets.render import RenderError, render_text
from finetune_studio.engine.datasets.schema import Conversation, PreferencePair, UnpairedExample


def prompt_messages(example) -> tuple | None:
    """The turns an answer follows: a pair's or KTO row's prompt, a conversation up to its last answer."""
    if isinstance(example, (PreferencePair, UnpairedExample)):
        return example.prompt
    if isinstance(example, Conversation):
        last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=None)
        return example.messages[:last] if last else None
    return None  # plain text has no prompt


def pick_prompts(tokenizer, examples: list, k: int) -> list[tuple[str, str]]:
    """Up to ``k`` (shown text, rendered prompt) from ``examples``, distinct, in order."""
    out: list[tuple[str, str]] = []
    seen = set()
    for ex in examples:
        if len(out) >= k:
            break
        msgs = prompt_messages(ex)
        if not msgs:
            continue
        try:
            text = render_text(tokenizer, msgs, getattr(ex, "tools", ()), add_generation_prompt=True)
        except RenderError:
            return []
        if text in seen:
            continue
        seen.add(text)
        shown = next((m.content for m in reversed(msgs) if m.role == "user"), msgs[-1].content)
        out.append((shown, text))
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, device: str) -> list[str]:
    """One batched greedy ``generate`` (left padding, KV cache) with the active adapter."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
