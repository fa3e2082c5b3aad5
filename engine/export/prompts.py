"""The conversations the export's check asks: the run's own validation prompts, split as training split them.

Training holds out ``validation_fraction`` of the dataset's distinct prompts (``datasets.split``, seeded by the
run's seed); the check takes the first few of those, so each form is compared with the trained model on prompts
it was not trained on. A run without a validation split is checked on its first training prompts (the check
compares forms with the trained model, so any prompt shows a difference); a dataset that cannot be read any more
falls back to one fixed prompt, and the report says which it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_studio.engine.datasets.schema import Conversation, PreferencePair, UnpairedExample
from finetune_studio.engine.datasets.split import split_by_prompt

FIXED_PROMPT = [{"role": "user", "content": "What is 2 plus 2? Answer in one short sentence."}]
CHECK_PROMPTS = 6  # conversations per check: enough to see a lost update, few enough for a CPU
MAX_PROMPT_CHARS = 2000  # longer prompts are skipped (CPU time in the check's fresh process)


@dataclass(frozen=True)
class CheckPrompts:
    """The conversations (lists of role/content dicts, ending before an answer) and where they came from."""

    conversations: list[list[dict]]
    source: str  # "validation", "training" or "fixed"
    description: str  # for the report, e.g. "6 of the run's 4 validation prompts"


def _prompt(example: object) -> list[dict] | None:
    """The turns an answer follows, as role/content dicts; None for plain text and tool-using examples."""
    if getattr(example, "tools", ()):
        return None  # the check renders with the chat template alone
    if isinstance(example, (PreferencePair, UnpairedExample)):
        turns = example.prompt
    elif isinstance(example, Conversation):
        last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=None)
        turns = example.messages[:last] if last else ()
    else:
        return None
    if not turns or any(m.tool_calls or m.role not in ("system", "user", "assistant") for m in turns):
        return None
    return [{"role": m.role, "content": m.content} for m in turns]


def _pick(examples: list, limit: int) -> list[list[dict]]:
    out: list[list[dict]] = []
    for example in examples:
        turns = _prompt(example)
        if turns is None or turns in out or sum(len(m["content"]) for m in turns) > MAX_PROMPT_CHARS:
            continue
        out.append(turns)
        if len(out) >= limit:
            break
    return out


def check_prompts(config: dict, limit: int = CHECK_PROMPTS) -> CheckPrompts:
    """Up to ``limit`` conversations for the check, from the run's ``config`` (its dataset, split and seed)."""
    from finetune_studio.engine.datasets.loader import load_dataset

    fixed = CheckPrompts([FIXED_PROMPT], "fixed", "one fixed prompt")
    spec = config.get("dataset") or ""
    if not spec:
        return fixed
    try:
        data = load_dataset(spec, config.get("dataset_mapping") or None, max_length=config.get("max_length"))
    except Exception as exc:  # moved, deleted or a store snapshot: the check still runs, on the fixed prompt
        return CheckPrompts([FIXED_PROMPT], "fixed", f"one fixed prompt (the run's dataset could not be read: {exc})")
    train, val = split_by_prompt(
        data.examples, float(config.get("validation_fraction") or 0), int(config.get("seed", 42))
    )
    chosen = _pick(val, limit)
    if chosen:
        return CheckPrompts(chosen, "validation", f"{len(chosen)} of the run's validation prompts")
    chosen = _pick(train, limit)
    if chosen:
        return CheckPrompts(chosen, "training", f"{len(chosen)} training prompts (the run held none out)")
    return fixed
