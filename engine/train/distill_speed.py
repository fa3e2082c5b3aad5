"""Generation speed of a distilled student beside its teacher: greedy new tokens per second, the models taking turns.

:func:`time_generation` times any models on the same prompts: one prompt at a time (what a person waiting on one
answer sees), greedy, through transformers' ``generate``; the models take turns prompt by prompt, so that a machine
busy with other work slows them alike, after one untimed warm-up answer each. Per wall-clock second and per CPU
second of this process (steadier on a busy machine).

:func:`measure` is what a distillation run does when it ends (``distill_measure_speed``): the teacher as the run
holds it and the trained student as it would be served (loaded from the run's saved folder, its adapter merged where
the method folds into the weights, in the teacher's dtype), each answer exactly ``new_tokens`` long (the same number
of decoding steps for both), on a few of the run's prompts (held-out first, then training ones). It returns the
``distill_speed`` event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core import methods
from finetune_studio.core.config import TrainConfig
from finetune_studio.core.protocol.distill_report import DistillSpeed
from finetune_studio.engine.models import LoadOptions, load_causal_lm

PROMPTS = 4  # prompts timed (after one warm-up answer)
NEW_TOKENS = 48  # new tokens of each answer
MAX_PROMPT_TOKENS = 256  # a longer prompt is cut from the front


def time_generation(
    models: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop: Sequence[int] | None = None,
    pad_id: int | None = None,
) -> dict[str, tuple[float, float]]:
    """New tokens per second of each model on ``prompts`` (token ids): (per wall-clock second, per CPU second).
    ``stop``: token ids that end an answer; None makes every answer ``max_new_tokens`` long. The first prompt is
    answered once more first, untimed (the warm-up)."""
    totals = {name: [0, 0.0, 0.0] for name in models}  # new tokens, wall seconds, CPU seconds
    fixed = stop is None
    for i, prompt in enumerate([prompts[0], *prompts]):
        for name, model in models.items():
            model.eval()
            device = next(model.parameters()).device
            ids = torch.tensor([list(prompt)], device=device)
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens if fixed else None,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=None if fixed else list(stop or ()),
                    pad_token_id=pad_id,
                )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first round is the warm-up
                totals[name][0] += out.shape[1] - ids.shape[1]
                totals[name][1] += time.perf_counter() - wall
                totals[name][2] += time.process_time() - cpu
    return {name: (n / max(w, 1e-9), n / max(c, 1e-9)) for name, (n, w, c) in totals.items()}


def prompt_ids(examples: Sequence[Any], k: int, most: int = MAX_PROMPT_TOKENS) -> list[list[int]]:
    """Up to ``k`` distinct prompts of tokenised examples: each one's tokens before its first trained token (the
    turns its answer follows), cut from the front to ``most`` tokens."""
    out: list[list[int]] = []
    for item in examples:
        labels = list(item.labels)
        first = next((i for i, label in enumerate(labels) if label != -100), 0)
        ids = list(item.input_ids[:first])[-most:]
        if ids and ids not in out:
            out.append(ids)
        if len(out) >= k:
            break
    return out


def load_student(folder: Path, model_folder: Path, config: TrainConfig, dtype: torch.dtype, device: str) -> Any:
    """The trained student as it would be served: a full fine-tune's saved model, or the model with the run's
    adapter (merged where the method folds into the weights)."""
    from finetune_studio.engine.bottleneck import load_adapter_folder
    from finetune_studio.engine.train.methods import full

    options = LoadOptions(allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    if full.is_full_model_folder(folder):
        return load_causal_lm(folder, dtype=dtype, device=device, quantize_4bit=False, options=options)
    base = load_causal_lm(model_folder, dtype=dtype, device=device, quantize_4bit=False, options=options)
    model = load_adapter_folder(base, folder)
    if methods.method(config.method).allows(methods.MERGE) and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def measure(
    teacher: Any,
    student: Any,
    examples: Sequence[Any],
    *,
    prompts: int = PROMPTS,
    new_tokens: int = NEW_TOKENS,
    pad_id: int | None = None,
) -> DistillSpeed | None:
    """The ``distill_speed`` event of ``teacher`` and ``student`` on up to ``prompts`` of ``examples``' prompts;
    None when the examples hold no prompt."""
    ids = prompt_ids(examples, prompts)
    if not ids:
        return None
    timed = time_generation({"teacher": teacher, "student": student}, ids, new_tokens, pad_id=pad_id)
    return DistillSpeed(
        prompts=len(ids),
        new_tokens=new_tokens,
        teacher_tokens_per_s=timed["teacher"][0],
        teacher_tokens_per_cpu_s=timed["teacher"][1],
        student_tokens_per_s=timed["student"][0],
        student_tokens_per_cpu_s=timed["student"][1],
        teacher_layers=int(getattr(teacher.config, "num_hidden_layers", 0) or 0),
        student_layers=int(getattr(student.config, "num_hidden_layers", 0) or 0),
        teacher_params=_params(teacher),
        student_params=_params(student),
    )


def _params(model: Any) -> int:
    """Parameters as held (4-bit packed weights counted as the values they hold)."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        total += 2 * n if p.dtype == torch.uint8 else n
    return total
