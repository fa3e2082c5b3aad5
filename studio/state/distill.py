"""What the app shows of a distillation run, Qt-free: whether a run is one, its figures' names, the student it trains
(the chosen model as it is, or pruned to fewer layers), and its generation speed beside the teacher's.

The engine stores a distillation's divergence to the teacher and its task loss per trained token as the steps' and
evaluations' named figures ``kl`` and ``ce``; at the run's end it times both models (``core.protocol.distill_report.
DistillSpeed``, kept by ``Store.distill_speed``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_studio.core.protocol.distill_report import DistillSpeed

OBJECTIVE = "distill"
STUDENT_FIELD = "distill_student_layers"  # 0: the chosen model as it is; N: the model pruned to N layers
STUDENT_HELP = (
    "The student is the chosen model as it is, or that model with fewer layers: the engine drops, one by one, the "
    "layers whose removal changes its predictions on the training data least, then distils the teacher into what is "
    "left (fewer layers generate faster)."
)


def is_distill(config: Mapping[str, Any], figure_names: Sequence[str] = ()) -> bool:
    """Whether a run is a distillation: its config's objective, or (a run whose config is not known) its figures."""
    objective = config.get("objective")
    if objective:
        return objective == OBJECTIVE
    return "ce" in figure_names and "reward" not in figure_names


def student_layers(value: object) -> int:
    """The form's ``distill_student_layers`` as a number of layers (0 for the model as it is, or text that is not a
    whole number: the form shows that field's own message)."""
    try:
        return max(0, int(str(value).strip() or 0))
    except ValueError:
        return 0


def student_layers_error(layers: int, model_layers: int) -> str:
    """What is wrong with pruning a model of ``model_layers`` layers (0: not known) to ``layers`` ("" when nothing)."""
    if layers and model_layers and layers >= model_layers:
        return (
            f"The model has {model_layers} layers: a smaller student keeps 1 to {model_layers - 1} of them (choose "
            "'this model' to distil into it as it is)."
        )
    return ""


def student_sentence(layers: int, model_layers: int) -> str:
    """The chosen student in one line, under the choice."""
    if not layers:
        return "The student is this model, all of its layers."
    of = f" of its {model_layers}" if model_layers else ""
    return f"The engine keeps the {layers}{of} layers that matter most on the training data."


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(speedup: float) -> str:
    if speedup <= 0:
        return ""
    if speedup >= 1:
        return f"{speedup:.1f}× faster"
    return f"{1 / speedup:.1f}× slower"


def _layers(n: int) -> str:
    return f" ({n} layer{'s' if n != 1 else ''})" if n else ""


def speed_line(speed: DistillSpeed) -> str:
    """One line: the student's generation speed beside the teacher's, per wall-clock second and per CPU second (the
    latter steadier on a busy machine), e.g. "Generation: student 812 tok/s (15 layers) vs teacher 420 tok/s (30
    layers): 1.9× faster · per CPU second 530 vs 270 tok: 2.0× faster"."""
    s, t = speed.student_tokens_per_s, speed.teacher_tokens_per_s
    line = (
        f"Generation: student {_rate(s)} tok/s{_layers(speed.student_layers)} vs teacher {_rate(t)} tok/s"
        f"{_layers(speed.teacher_layers)}"
    )
    ratio = _ratio(speed.speedup)
    if ratio:
        line += f": {ratio}"
    cpu = _ratio(speed.speedup_cpu)
    if cpu:
        line += (
            f" · per CPU second {_rate(speed.student_tokens_per_cpu_s)} vs {_rate(speed.teacher_tokens_per_cpu_s)}"
            f" tok: {cpu}"
        )
    return line


def speed_details(speed: DistillSpeed) -> str:
    """What the figures were measured on (a tooltip): prompts, new tokens, parameters."""
    bits = [f"greedy, one prompt at a time, the two models taking turns: {speed.prompts} prompts"]
    if speed.new_tokens:
        bits[0] += f", up to {speed.new_tokens} new tokens each"
    if speed.student_params and speed.teacher_params:
        bits.append(
            f"parameters: student {speed.student_params / 1e6:,.1f} M, teacher {speed.teacher_params / 1e6:,.1f} M"
        )
    bits.append("per CPU second: new tokens per second of the engine's CPU time, steadier on a busy machine")
    return "\n".join(bits)
