"""Which weights the generation worker decodes with (``LoadModel.weights``), as a person picks them: each option with
what it measured on a model, and the default, the fastest option that keeps the answers.

The figures are ``benchmarks/annotate_bench.py``'s (RESULTS.md, "Annotate's candidates: prompts batched"): the time
for Annotate's 10 prompts x 2 answers x 64 new tokens with the prompts batched, and the quality cost against full
weights (token-level: the quantised model's most likely next token is full precision's, along full precision's
greedy answers). They hold for the model they were measured on; for any other model the options say so, and the
default is ``full``. ``int8`` and ``int4`` are CPU speed-ups: on a GPU the worker loads ``full`` whatever is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from finetune_studio.core.protocol.generation import WEIGHTS, Weights


@dataclass(frozen=True)
class WeightsFigures:
    """What one option measured on one model (``benchmarks/annotate_bench.py``)."""

    session_s: float  # 10 prompts x 2 answers x 64 new tokens, prompts batched, on the machine below
    speedup: float  # full weights' time over this option's, same run
    top1: float  # token-level agreement with full weights (teacher-forced along full's greedy answers), 0-1
    greedy_same: float  # share of full weights' greedy tokens reproduced before the first difference, 0-1


@dataclass(frozen=True)
class WeightsOption:
    """One choice for a control: ``weights`` to send, ``label`` to show, ``detail`` (what it costs) beside it."""

    weights: Weights
    label: str
    detail: str


NAMES = {
    "full": "Full precision",
    "int8": "int8 weights",
    "int4": "int4 weights",
}
KEEPS_ANSWERS = 0.97  # the least token-level agreement with full weights that counts as keeping the answers
MEASURED_ON = "dev-cpu (2 shared cores, one worker thread), commit 0a3ce55, load average 3-4 (timings), once"
BUNDLED = ("default", "smollm2-135m-instruct")  # the bundled model's spec and its converted folder's name
MEASURED: dict[str, dict[str, WeightsFigures]] = {
    "default": {
        "full": WeightsFigures(session_s=17.8, speedup=1.0, top1=1.0, greedy_same=1.0),
        "int8": WeightsFigures(session_s=15.2, speedup=1.17, top1=0.966, greedy_same=0.394),
        "int4": WeightsFigures(session_s=28.4, speedup=0.63, top1=0.975, greedy_same=0.542),
    },
}


def _key(model: str) -> str:
    """The key of ``model``'s figures in :data:`MEASURED` (the bundled model by spec or by folder)."""
    if model in BUNDLED or PurePath(model.rstrip("/\\") or "/").name in BUNDLED[1:]:
        return "default"
    return model


def figures(model: str) -> dict[str, WeightsFigures]:
    """The measured figures of each option on ``model`` (empty where it was not measured)."""
    return MEASURED.get(_key(model), {})


def default_weights(model: str) -> Weights:
    """The fastest option measured on ``model`` whose answers agree with full weights at least
    :data:`KEEPS_ANSWERS` token by token; ``full`` where the model was not measured."""
    measured = figures(model)
    keeping = [w for w in WEIGHTS if w in measured and measured[w].top1 >= KEEPS_ANSWERS]
    return max(keeping, key=lambda w: measured[w].speedup, default="full")


def weights_options(model: str) -> list[WeightsOption]:
    """Every option with its measured cost on ``model`` (or that it was not measured), the default marked."""
    measured, chosen = figures(model), default_weights(model)
    out = []
    for weights in WEIGHTS:
        f = measured.get(weights)
        if f is None:
            detail = (
                "the weights as loaded: the model's own answers"
                if weights == "full"
                else "faster on a CPU; not measured on this model (benchmarks/annotate_bench.py --model ...)"
            )
        elif weights == "full":
            detail = f"{f.session_s:.0f} s for 10 prompts x 2 answers x 64 tokens; the model's own answers"
        else:
            detail = (
                f"x{f.speedup:.1f} full's speed ({f.session_s:.0f} s for 10 prompts x 2 answers x 64 tokens); "
                f"{100 * f.top1:.1f}% of tokens as full precision's"
            )
        label = NAMES[weights] + (" (recommended)" if weights == chosen else "")
        out.append(WeightsOption(weights, label, detail))
    return out
