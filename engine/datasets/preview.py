"""A rendered example exactly as training sees it: the tokens after the chat template, trained parts marked.

The tokens come from :func:`engine.render.tokenize_example`, the trainer's own path. Each run of tokens that is
(or is not) trained on becomes a segment ``{"text", "trained", "tokens"}``; for a preference pair the chosen and
the rejected sequences are shown side by side.
"""

from __future__ import annotations

from finetune_studio.engine.datasets.schema import example_to_dict


def segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[dict]:
    """Runs of consecutive tokens with the same trained flag, decoded to text."""
    from finetune_studio.engine.render import IGNORE

    out: list[dict] = []
    run: list[int] = []
    flag = None
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if run and trained != flag:
            out.append(_segment(tokenizer, run, flag))
            run = []
        run.append(tok)
        flag = trained
    if run:
        out.append(_segment(tokenizer, run, flag))
    return out


def _segment(tokenizer, ids: list[int], trained: bool) -> dict:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {"text": text, "trained": trained, "tokens": len(ids)}


def _sequence(tokenizer, tokenized) -> dict:
    return {
        "text": tokenizer.decode(tokenized.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        "segments": segments(tokenizer, tokenized.input_ids, tokenized.labels),
        "tokens": len(tokenized.input_ids),
        "trained_tokens": tokenized.trained_tokens,
        "truncated": tokenized.truncated,
    }


def preview_example(example, tokenizer=None, max_length: int = 512, loss_on: str = "assistant") -> dict:
    """The example in internal form and, with a tokenizer, as rendered tokens with the trained part marked.

    Raises ``engine.render.RenderError`` when the chat template refuses the example.
    """
    out = {"line": example.source_line, "kind": example.kind, "data": example_to_dict(example)}
    if tokenizer is None:
        return out
    from finetune_studio.engine.render import TokenizedPair, tokenize_example

    tokenized = tokenize_example(tokenizer, example, max_length, loss_on)
    if isinstance(tokenized, TokenizedPair):
        out["prompt_tokens"] = tokenized.prompt_tokens
        out["difference_truncated"] = tokenized.difference_truncated
        out["chosen"] = _sequence(tokenizer, tokenized.chosen)
        out["rejected"] = _sequence(tokenizer, tokenized.rejected)
    else:
        out.update(_sequence(tokenizer, tokenized))
    return out


def marked_text(sequence: dict, start: str = "[[", end: str = "]]") -> str:
    """A sequence's text with each trained segment wrapped in ``start`` ... ``end`` (for terminals)."""
    return "".join(f"{start}{s['text']}{end}" if s["trained"] else s["text"] for s in sequence["segments"])
