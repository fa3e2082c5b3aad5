"""Checks that need numbers: token lengths, truncation, rows with nothing to train on, length bias.

Token counts come from :mod:`engine.datasets.render`, the same code the trainer uses, so "exceeds max_length" here means
exactly what it will mean in training. Everything else (length bias in characters) works without a tokenizer.
"""

from __future__ import annotations

from finetune_studio.core.memory.estimate import LONGEST_KEPT
from finetune_studio.core.protocol.dataset_report import LengthBias, LengthStats, TokenStats
from finetune_studio.engine.datasets.problems import ProblemLog
from finetune_studio.engine.datasets.schema import Conversation, Message, PreferencePair, UnpairedExample

UNLIMITED = 10**9  # a max_length that never truncates: gives full lengths
BIAS_WARN = 0.75  # warn when chosen is longer (or shorter) in more than this share of pairs


def answer_chars(msgs) -> int:
    return sum(len(m.content) for m in msgs)


def char_length_bias(examples: list) -> LengthBias | None:
    """Length bias of preference pairs in characters of the answers (no tokenizer needed)."""
    pairs = [ex for ex in examples if isinstance(ex, PreferencePair)]
    return LengthBias.of(
        "characters", [answer_chars(p.chosen) for p in pairs], [answer_chars(p.rejected) for p in pairs]
    )


def warn_length_bias(bias: LengthBias | None, log: ProblemLog) -> None:
    if bias is None or bias.pairs < 10:
        return
    share = bias.chosen_longer_share
    if share > BIAS_WARN or share < 1 - BIAS_WARN:
        side = "longer" if share > BIAS_WARN else "shorter or equal"
        pct = share if share > BIAS_WARN else 1 - share
        log.add(
            f"length bias: the chosen answer is {side} in {pct:.0%} of pairs (mean {bias.mean_chosen:g} vs "
            f"{bias.mean_rejected:g} {bias.unit}); DPO may learn answer length rather than quality",
            level="warning",
            kind="length bias",
        )


def token_report(
    examples: list, tokenizer, max_length: int, loss_on: str, log: ProblemLog, limit: int | None = None
) -> TokenStats:
    """Tokenise (up to ``limit``) examples exactly as training will, and count what matters."""
    from finetune_studio.engine.datasets.render import RenderError, tokenize_example

    measured = examples[:limit] if limit else examples
    lengths, trained, chosen_len, rejected_len = [], [], [], []
    row_lengths, row_trained = [], []  # per batch row, untruncated
    over = empty = diff_cut = failures = 0
    for ex in measured:
        try:
            full = tokenize_example(tokenizer, ex, UNLIMITED, loss_on)
            rows = (full.chosen, full.rejected) if isinstance(ex, PreferencePair) else (full,)
            row_lengths += [len(r.input_ids) for r in rows]
            row_trained += [r.trained_tokens for r in rows]
            if isinstance(ex, PreferencePair):
                n = max(len(full.chosen.input_ids), len(full.rejected.input_ids))
                chosen_len.append(len(full.chosen.input_ids) - full.prompt_tokens)
                rejected_len.append(len(full.rejected.input_ids) - full.prompt_tokens)
            else:
                n = len(full.input_ids)
            cut = tokenize_example(tokenizer, ex, max_length, loss_on) if n > max_length else full
        except RenderError as exc:
            failures += 1
            log.add(f"cannot be rendered: {exc}", ex.source_line, kind=f"rows the chat template refuses ({exc})")
            continue
        lengths.append(n)
        over += n > max_length
        if isinstance(ex, PreferencePair):
            kept = min(cut.chosen.trained_tokens, cut.rejected.trained_tokens)
            if cut.difference_truncated:
                diff_cut += 1
                log.add(
                    f"chosen and rejected differ only after max_length {max_length}: the pair teaches nothing",
                    ex.source_line,
                    kind="pairs whose difference is cut off by max_length",
                )
        else:
            kept = cut.trained_tokens
        trained.append(kept)
        if kept == 0:
            empty += 1
            log.add(
                f"no trained tokens left after truncation to {max_length}",
                ex.source_line,
                kind="rows with no trained tokens after truncation",
            )
    if over:
        log.add(
            f"{over} of {len(lengths)} rows are longer than max_length {max_length} and will be truncated",
            level="warning",
            kind="rows longer than max_length",
        )
    bias = LengthBias.of("tokens", chosen_len, rejected_len)
    return TokenStats(
        max_length,
        len(measured),
        LengthStats.of(lengths),
        LengthStats.of(trained),
        over,
        empty,
        diff_cut,
        failures,
        bias,
        tuple(sorted(row_lengths, reverse=True)[:LONGEST_KEPT]),
        tuple(sorted(row_trained, reverse=True)[:LONGEST_KEPT]),
    )


def uses_tools(ex) -> bool:
    """Whether an example offers tool schemas or makes tool calls."""
    turns: tuple[Message, ...] = ()
    if isinstance(ex, Conversation):
        turns = ex.messages
    elif isinstance(ex, PreferencePair):
        turns = ex.prompt + ex.chosen + ex.rejected
    elif isinstance(ex, UnpairedExample):
        turns = ex.prompt + ex.completion
    return bool(getattr(ex, "tools", ())) or any(m.tool_calls for m in turns)


def template_warnings(examples: list, tokenizer, log: ProblemLog) -> None:
    """Data that uses tools while the chat template ignores them renders tool turns as empty text."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = " ".join(template.values()) if isinstance(template, dict) else ""

    if template and "tool" not in template and any(uses_tools(ex) for ex in examples):
        log.add(
            "the data has tool schemas or tool calls, but this model's chat template ignores them: tool-call "
            "turns render as empty answers; use a model whose template supports tools",
            level="warning",
            kind="template without tools",
        )
