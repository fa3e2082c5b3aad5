"""The set-up page's state, Qt-free: raw form values, their errors, the model and the dataset.

Values are kept as the form gives them (numbers as text) and validated with
:class:`core.config.TrainConfig` on every change: each field alone first (so
every bad field gets its own message next to it), then the whole config, then
combinations that need the model or the dataset (DPO on an SFT dataset...).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from finetune_studio.core.config import OBJECTIVES, ConfigError, TrainConfig
from finetune_studio.core.protocol.dataset_report import DatasetReport
from finetune_studio.core.protocol.device_report import DeviceReport
from finetune_studio.studio.state import distill
from finetune_studio.studio.state import rewards as reward_rows
from finetune_studio.studio.state.observable import Observable

HELP = TrainConfig.field_help()
FIELDS = list(HELP)
# Fields with their own widgets on the set-up page; the rest are generated as a form.
OWN_WIDGETS = ("model", "dataset", "method", "objective", "parallelism", "rewards", distill.STUDENT_FIELD)
PREFERENCE_KINDS = ("preference", "unpaired")
# What each objective trains, in one sentence (shown under the objective's buttons).
OBJECTIVE_SENTENCES = {
    "sft": "SFT trains the model to write the dataset's answers.",
    "dpo": "DPO trains the model to prefer the chosen answer of each pair over the rejected one.",
    "reward": "Reward model trains a scorer from preference pairs: it learns to give the chosen answer the higher "
    "score, and can then rank answers or serve as a reward for GRPO.",
    "grpo": "GRPO trains the model online: it samples several answers per prompt, scores them with the rewards "
    "below and learns from the better ones.",
    "ppo": "PPO trains the model online as in RLHF: it samples answers, scores them with the rewards below, and "
    "learns from each token's advantage over a value head that it trains alongside.",
    "distill": "Distillation trains the model to match a teacher model's next-token distributions.",
}
OBJECTIVES_WITH_REWARDS = ("grpo", "ppo")  # the objectives that score answers with TrainConfig.rewards


def to_form(name: str, value: Any) -> Any:
    """A config value as a form shows it: booleans and choices as is, everything else as text."""
    default = HELP[name]["default"]
    if name == reward_rows.FIELD:
        return reward_rows.form_rows(value)
    if isinstance(default, bool) or "choices" in HELP[name] or isinstance(value, str):
        return value
    if isinstance(default, list):
        return ", ".join(map(str, value))
    if isinstance(default, dict):
        return json.dumps(value) if value else ""
    if isinstance(default, float):
        return f"{value:g}"
    return str(value)


def from_form(name: str, value: Any) -> Any:
    default = HELP[name]["default"]
    if name == reward_rows.FIELD:
        return reward_rows.typed_specs(value)
    if isinstance(default, dict) and isinstance(value, str):
        if not value.strip():
            return {}
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(name, f'must be a JSON object such as {{"prompt": "question"}} ({exc.msg})') from None
    if isinstance(value, str):
        value = value.strip()
    return value


class SetupState(Observable):
    """Topics: 'values' (a field changed; the name follows after a colon), 'errors', 'model', 'dataset',
    'devices' (the engine's device report), 'processes' (how many the run starts with)."""

    def __init__(self, initial: dict | None = None):
        super().__init__()
        self.values: dict[str, Any] = {n: to_form(n, HELP[n]["default"]) for n in FIELDS}
        self.errors: dict[str, str] = {}
        self.config: TrainConfig | None = None
        self.model_info = None  # core.protocol.events.ModelReady
        self.model_message = ""  # loading / error text for the model panel
        self.dataset_info: DatasetReport | None = None  # the engine's report (`engine data inspect --json`)
        self.dataset_message = ""
        self.dataset_pending = False  # the engine is checking it; Start is not held up for that
        self.devices: DeviceReport | None = None  # the engine's answer to `devices --json` (asked with 2+ GPUs)
        self.processes = 1  # `train --nproc N`: one process per GPU; 1 is a plain one-process run
        self.reward_check = reward_rows.RewardsCheck({})  # each reward's problem, shown beside it (GRPO)
        if initial:
            self.load(initial, quiet=True)
        self.validate()

    # --- changing -------------------------------------------------------------
    def set(self, name: str, value: Any) -> None:
        if self.values.get(name) == value:
            return
        self.values[name] = value
        self.notify(f"values:{name}")
        self.validate()

    def load(self, config: dict, *, quiet: bool = False) -> None:
        """Apply a preset or a past run's config (known fields only; unknown ones are ignored)."""
        for name, value in config.items():
            if name in HELP:
                self.values[name] = to_form(name, value)
        if not quiet:
            self.notify("values:*")
            self.validate()

    def set_model_info(self, info, message: str = "") -> None:
        self.model_info, self.model_message = info, message
        self.notify("model")
        self.validate()

    def set_dataset_info(self, info: DatasetReport | None, message: str = "", *, pending: bool = False) -> None:
        self.dataset_info, self.dataset_message, self.dataset_pending = info, message, pending
        self.notify("dataset")
        self.validate()

    def set_devices(self, report: DeviceReport | None) -> None:
        """The GPUs the engine can use; the number of processes stays within them (1 with fewer than two)."""
        self.devices = report
        self.notify("devices")
        self.set_processes(self.processes if self.several_gpus else 1, force=True)

    def set_processes(self, n: int, *, force: bool = False) -> None:
        n = max(1, min(int(n), self.max_processes))
        if n == self.processes and not force:
            return
        self.processes = n
        self.notify("processes")
        self.validate()

    @property
    def several_gpus(self) -> bool:
        return self.devices is not None and self.devices.several_gpus

    @property
    def max_processes(self) -> int:
        return self.devices.max_processes if self.devices is not None else 1

    # --- checking -------------------------------------------------------------
    @property
    def uses_rewards(self) -> bool:
        """The chosen objective scores answers with the rewards (GRPO): the editor shows, and they are checked."""
        return self.values.get("objective") in OBJECTIVES_WITH_REWARDS

    def typed_values(self) -> tuple[dict, dict]:
        out: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name in FIELDS:
            if name == reward_rows.FIELD and not self.uses_rewards:
                out[name] = []  # kept in the form for when GRPO is chosen again; not part of another objective's run
                continue
            if name == distill.STUDENT_FIELD and self.values.get("objective") != distill.OBJECTIVE:
                out[name] = 0  # the student kept in the form for when Distil is chosen again
                continue
            try:
                out[name] = from_form(name, self.values[name])
            except ConfigError as exc:
                errors[name] = _reason(exc)
        return out, errors

    def validate(self) -> None:
        values, errors = self.typed_values()
        # each field alone, so every bad field is named; with the objective, which some fields depend on
        # (``pairs:`` data is DPO's)
        context = {"objective": values["objective"]} if values.get("objective") in OBJECTIVES else {}
        if context and reward_rows.FIELD in values and reward_rows.FIELD not in errors:
            context[reward_rows.FIELD] = values[reward_rows.FIELD]  # GRPO's settings are checked with its rewards
        if context and values.get("distill_teacher") and "distill_teacher" not in errors:
            context["distill_teacher"] = values["distill_teacher"]  # distillation's settings need its teacher
        # what a method allows depends on the method and these (core.methods: packing, lora_init)
        context.update({k: values[k] for k in ("method", "packing") if k in values and k not in errors})
        for name, value in values.items():
            if name in errors:
                continue
            try:
                TrainConfig.from_dict({**context, name: value})
            except ConfigError as exc:
                errors[exc.field if exc.field in HELP else name] = _reason(exc)
        config = None
        if not errors:
            try:
                config = TrainConfig.from_dict(values)
            except ConfigError as exc:
                errors[exc.field if exc.field in HELP else "model"] = _reason(exc)
        errors.update(self._combination_errors(values, errors))
        self.reward_check = reward_rows.check_rows(self.values.get(reward_rows.FIELD, []), needed=self.uses_rewards)
        if self.uses_rewards and reward_rows.FIELD in HELP and not self.reward_check.ok:
            # each reward's own message beside it; the first one (and how many more) in the list of problems
            errors[reward_rows.FIELD] = self.reward_check.summary()
        self.config = config if not errors else None
        if errors != self.errors or config is None:
            self.errors = errors
        self.notify("errors")

    def _combination_errors(self, values: dict, errors: dict) -> dict:
        out = {}
        if not str(values.get("dataset", "")).strip():
            out["dataset"] = "Choose a dataset file or folder."
        elif self.dataset_message and self.dataset_info is None and not self.dataset_pending:
            out["dataset"] = self.dataset_message
        info = self.dataset_info
        kind = info.kind if info is not None else ""
        if kind and "objective" not in errors:
            objective = values.get("objective")
            if objective in ("dpo", "reward") and kind not in PREFERENCE_KINDS:
                what = "DPO" if objective == "dpo" else "A reward model"
                out["objective"] = (
                    f"{what} needs preference data (prompt, chosen, rejected); this dataset is "
                    f"{kind}. Choose SFT, or a preference dataset."
                )
        if info is not None and info.rows == 0:
            out["dataset"] = "The dataset has no usable rows; see the checks below."
        n = self.processes
        if n > 1 and "batch_size" not in errors and "gradient_accumulation_steps" not in errors:
            try:
                per_step = int(values["batch_size"]) * int(values["gradient_accumulation_steps"])
            except (TypeError, ValueError):
                per_step = 0
            if per_step % n:
                out["batch_size"] = (
                    f"With {n} processes the global batch (batch_size x gradient_accumulation_steps = {per_step}) "
                    f"must split evenly: choose a multiple of {n}."
                )
        model = self.model_info
        if distill.STUDENT_FIELD not in errors:
            why = distill.student_layers_error(
                distill.student_layers(values.get(distill.STUDENT_FIELD)), int(getattr(model, "layers", 0) or 0)
            )
            if why:
                out[distill.STUDENT_FIELD] = why
        ctx = getattr(model, "context_length", 0) or 0
        if ctx and "max_length" not in errors:
            try:
                if int(values["max_length"]) > ctx:
                    out["max_length"] = f"The model reads at most {ctx} tokens; use {ctx} or less."
            except (TypeError, ValueError):
                pass
        return out

    @property
    def ready(self) -> bool:
        return self.config is not None and not self.errors

    def config_dict(self) -> dict:
        """The values as a config dict (may be invalid; used to remember the last choices)."""
        values, _ = self.typed_values()
        if reward_rows.FIELD in values:  # remembered whatever the objective, as far as they can be read
            try:
                values[reward_rows.FIELD] = reward_rows.typed_specs(self.values[reward_rows.FIELD])
            except ConfigError:
                values[reward_rows.FIELD] = self.values[reward_rows.FIELD]
        defaults = {f.name for f in dataclasses.fields(TrainConfig)}
        return {k: v for k, v in values.items() if k in defaults}


def _reason(exc: ConfigError) -> str:
    """The message without the leading 'field: ' (the form shows it next to the field)."""
    text = str(exc)
    prefix = f"{exc.field}: "
    text = text[len(prefix) :] if text.startswith(prefix) else text
    return text[:1].upper() + text[1:]
