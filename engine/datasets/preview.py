"""A rendered example exactly as training sees it: the tokens after the chat template, trained parts marked.

The tokens come from :func:`engine.datasets.render.tokenize_example`, the trainer's own path. Each run of tokens that is
(or is not) trained on becomes a :class:`core.protocol.dataset_report.Segment`; for a preference pair the chosen and the
rejected sequences are shown side by side.
"""

from __future__ import annotations

from finetune_studio.core.protocol.dataset_report import ExamplePreview, RenderedSequence, Segment
from finetune_studio.engine.datasets.schema import example_to_dict


def segments(tokenizer, input_ids: list[int], labels: list[int]) -> tuple[Segment, ...]:
    """Runs of consecutive tokens with the same trained flag, decoded to text."""
    from finetune_studio.engine.datasets.render import IGNORE

    out: list[Segment] = []
    run: list[int] = []
    flag = False
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if run and trained != flag:
            out.append(_segment(tokenizer, run, flag))
            run = []
        run.append(tok)
        flag = trained
    if run:
        out.append(_segment(tokenizer, run, flag))
    return tuple(out)


def _segment(tokenizer, ids: list[int], trained: bool) -> Segment:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return Segment(text=text, trained=trained, tokens=len(ids))


def _sequence(tokenizer, tokenized) -> RenderedSequence:
    return RenderedSequence(
        text=tokenizer.decode(tokenized.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        segments=segments(tokenizer, tokenized.input_ids, tokenized.labels),
        tokens=len(tokenized.input_ids),
        trained_tokens=tokenized.trained_tokens,
        truncated=bool(tokenized.truncated),
    )


def preview_example(example, tokenizer=None, max_length: int = 512, loss_on: str = "assistant") -> ExamplePreview:
    """The example in internal form and, with a tokenizer, as rendered tokens with the trained part marked.

    Raises ``engine.datasets.render.RenderError`` when the chat template refuses the example.
    """
    plain = ExamplePreview(line=example.source_line, kind=example.kind, data=example_to_dict(example))
    if tokenizer is None:
        return plain
    from finetune_studio.engine.datasets.render import TokenizedPair, tokenize_example

    tokenized = tokenize_example(tokenizer, example, max_length, loss_on)
    if isinstance(tokenized, TokenizedPair):
        return ExamplePreview(
            line=plain.line,
            kind=plain.kind,
            data=plain.data,
            prompt_tokens=tokenized.prompt_tokens,
            difference_truncated=bool(tokenized.difference_truncated),
            chosen=_sequence(tokenizer, tokenized.chosen),
            rejected=_sequence(tokenizer, tokenized.rejected),
        )
    return ExamplePreview(line=plain.line, kind=plain.kind, data=plain.data, sequence=_sequence(tokenizer, tokenized))
