"""Render examples through the model's chat template into token ids and loss labels.

This is the single place where text becomes tokens: training and the dataset
preview both call it, so the preview shows exactly what the model is trained on.

Labels follow the transformers convention: ``-100`` marks a token that is not
trained on. The trained span of an assistant turn runs from the end of the
rendered prompt (``add_generation_prompt=True``) to the end of the rendered
turn, so the end-of-turn token is learned too.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_studio.engine.datasets.schema import Conversation, Message, PreferencePair, TextExample, UnpairedExample

IGNORE = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass(frozen=True)
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    prompt_tokens: int
    # The answers differ only in tokens cut off by max_length: the pair teaches nothing.
    difference_truncated: bool = False


class RenderError(ValueError):
    """The example cannot be rendered with this tokenizer (no chat template, template error...)."""


def _dicts(messages: tuple[Message, ...] | list[Message]) -> list[dict]:
    return [m.to_dict() for m in messages]


def render_text(tokenizer, messages, tools=(), *, add_generation_prompt: bool = False) -> str:
    """The chat template applied to ``messages``, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise RenderError(
            "this model's tokenizer has no chat template; use a plain 'text' dataset or an instruct model"
        )
    kwargs = {"tools": list(tools)} if tools else {}
    try:
        return tokenizer.apply_chat_template(
            _dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # jinja errors: roles the template refuses, alternation rules...
        raise RenderError(f"the chat template refused this conversation: {exc}") from None


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _label_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels that keep the tokens whose characters start inside one of ``spans``."""
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        inside = any(a <= start < b or (start == end == b and b > a) for a, b in spans)
        labels.append(tok if inside else IGNORE)
    return labels


def tokenize_conversation(tokenizer, conv: Conversation, max_length: int, loss_on: str = "assistant") -> Tokenized:
    """SFT: the whole conversation, trained on assistant turns (or on every token with ``loss_on='all'``)."""
    msgs = conv.messages
    full = render_text(tokenizer, msgs, conv.tools)
    spans = []
    for i, m in enumerate(msgs):
        if m.role != "assistant" or m.train is False:
            continue
        before = render_text(tokenizer, msgs[:i], conv.tools, add_generation_prompt=True) if i else None
        upto = render_text(tokenizer, msgs[: i + 1], conv.tools)
        if before is None or not full.startswith(upto) or not upto.startswith(before):
            # A first assistant turn (the template may add a default system prompt before it), or a template
            # that rewrites earlier turns (e.g. drops reasoning): train on the content's last match.
            start = full.rfind(m.content, 0, len(upto) if full.startswith(upto) else len(full))
            if start < 0:
                continue
            spans.append((start, start + len(m.content)))
        else:
            spans.append((len(before), len(upto)))
    ids, offsets = _encode(tokenizer, full)
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = _label_spans(ids, offsets, spans)
    truncated = len(ids) > max_length
    return Tokenized(ids[:max_length], labels[:max_length], truncated)


def tokenize_text(tokenizer, example: TextExample, max_length: int) -> Tokenized:
    ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Tokenized(ids[:max_length], ids[:max_length], len(ids) > max_length)


def _prompt_and_completion(tokenizer, prompt, completion, tools, max_length: int):
    """Token ids of prompt and completion, rendered together so the join tokenises as in training."""
    prompt_text = render_text(tokenizer, prompt, tools, add_generation_prompt=True)
    full = render_text(tokenizer, tuple(prompt) + tuple(completion), tools)
    if not full.startswith(prompt_text):
        raise RenderError("the chat template renders the prompt differently once an answer follows it")
    ids, offsets = _encode(tokenizer, full)
    split = next((i for i, (s, _e) in enumerate(offsets) if s >= len(prompt_text)), len(ids))
    return ids[:split], ids[split:]


def prompt_and_completion_ids(tokenizer, prompt, completion, tools=()) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (ending with the generation prompt) and of ``completion`` after it, rendered together
    so that the join tokenises as in training (an online RL objective samples its answers after the first part)."""
    return _prompt_and_completion(tokenizer, prompt, completion, tools, 0)


def _prompt_keep(prompt_len: int, longest_completion: int, max_length: int) -> int:
    """How many prompt tokens fit: the completion keeps at least half of ``max_length``; the prompt's end is kept."""
    if prompt_len + longest_completion <= max_length:
        return prompt_len
    comp_keep = min(longest_completion, max(max_length // 2, max_length - prompt_len))
    return max_length - comp_keep


def _cut(prompt_ids: list[int], comp_ids: list[int], keep: int, max_length: int) -> Tokenized:
    p_fit = prompt_ids[len(prompt_ids) - keep :] if keep else []
    c_fit = comp_ids[: max_length - len(p_fit)]
    cut = len(p_fit) < len(prompt_ids) or len(c_fit) < len(comp_ids)
    return Tokenized(p_fit + c_fit, [IGNORE] * len(p_fit) + c_fit, cut)


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int) -> TokenizedPair:
    """DPO: chosen and rejected each as prompt + answer, labels on the answer only.

    Both sides keep the same prompt tokens (cut once, for the longer answer), so their log-probs are
    conditioned on the same context.
    """
    p_c, c_ids = _prompt_and_completion(tokenizer, pair.prompt, pair.chosen, pair.tools, max_length)
    p_r, r_ids = _prompt_and_completion(tokenizer, pair.prompt, pair.rejected, pair.tools, max_length)
    keep = min(_prompt_keep(len(p_c), max(len(c_ids), len(r_ids)), max_length), len(p_c), len(p_r))
    chosen, rejected = _cut(p_c, c_ids, keep, max_length), _cut(p_r, r_ids, keep, max_length)
    same_after_cut = chosen.input_ids == rejected.input_ids and c_ids != r_ids
    return TokenizedPair(chosen, rejected, prompt_tokens=len(p_c), difference_truncated=same_after_cut)


def tokenize_unpaired(tokenizer, ex: UnpairedExample, max_length: int) -> Tokenized:
    p_ids, c_ids = _prompt_and_completion(tokenizer, ex.prompt, ex.completion, (), max_length)
    return _cut(p_ids, c_ids, _prompt_keep(len(p_ids), len(c_ids), max_length), max_length)


def tokenize_example(tokenizer, example, max_length: int, loss_on: str = "assistant"):
    """Dispatch on the example's kind. Text far beyond ``max_length`` tokens is cut first (``datasets.bound``),
    so the work per row stays bounded whatever the row's length."""
    from finetune_studio.engine.datasets.bound import char_budget, cut_example

    example, _cut = cut_example(example, char_budget(max_length))
    if isinstance(example, Conversation):
        return tokenize_conversation(tokenizer, example, max_length, loss_on)
    if isinstance(example, PreferencePair):
        return tokenize_pair(tokenizer, example, max_length)
    if isinstance(example, TextExample):
        return tokenize_text(tokenizer, example, max_length)
    if isinstance(example, UnpairedExample):
        return tokenize_unpaired(tokenizer, example, max_length)
    raise TypeError(f"cannot tokenize {type(example).__name__}")
