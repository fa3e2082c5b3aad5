"""Starting a run from an adapter (``init_adapter``): find it, load it, and keep a frozen copy as DPO's reference.

``init_adapter`` names a run (its final adapter), ``RUN:step-000050`` / ``RUN:50`` (a checkpoint of that run),
``RUN:best`` (its best checkpoint under early stopping), or a folder holding a PEFT adapter (an export, or any
checkpoint folder). The run it came from becomes the new run's parent.

DPO from an adapter: the reference model must be the starting model (base + starting adapter), not the bare base,
so that the loss starts at exactly ln 2 with margin 0. One copy of the base weights serves both: the adapter is
loaded twice into the PEFT model, once trainable (``default``) and once frozen (``reference``), and the reference
log-probs are computed with the ``reference`` adapter active (:func:`reference_adapter`).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.store import RunRecord, Store
from finetune_studio.engine import bottleneck, checkpoint
from finetune_studio.engine.train import adapters

ADAPTER_CONFIG = "adapter_config.json"
REFERENCE = "reference"
_CHECKPOINT_NAME = re.compile(r"step-\d+")  # what may follow RUN: besides 'best' (a folder in its checkpoints/)


@dataclass(frozen=True)
class StartingAdapter:
    path: Path  # a folder with adapter_config.json and adapter_model.safetensors
    parent_run_id: str  # "" for a folder outside any run
    description: str  # for the log: "run X's final adapter", "checkpoint step-000050 of run X", a folder


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _is_adapter(folder: Path) -> bool:
    config = ADAPTER_CONFIG if not bottleneck.is_bottleneck_folder(folder) else bottleneck.CONFIG_FILE
    return (folder / config).is_file() and (folder / "adapter_model.safetensors").is_file()


def _owning_run(store: Store, folder: Path) -> RunRecord | None:
    """The run whose folder holds ``folder`` (its adapter/, best/ or checkpoints/step-N/)."""
    for parent in list(folder.resolve().parents)[:3]:
        if (parent / "config.json").is_file():
            return store.find_run(str(parent))
    return None


def resolve(ref: str, store: Store) -> StartingAdapter:
    ref = ref.strip()
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if not _is_adapter(folder):
            raise ConfigError(
                "init_adapter", f"{folder} holds no PEFT adapter ({ADAPTER_CONFIG} and adapter_model.safetensors)"
            )
        run = _owning_run(store, folder)
        return StartingAdapter(folder.resolve(), run["id"] if run else "", f"the adapter in {folder}")
    run_ref, _, which = ref.partition(":") if ":" in ref else (ref, "", "")
    run = store.find_run(run_ref)
    if run is None:
        raise ConfigError(
            "init_adapter",
            f"no run or adapter folder named {run_ref!r}: give a run id, RUN:step-000050, or an adapter folder",
        )
    run_dir = Path(run["run_dir"])
    found = [p.name for p in checkpoint.list_checkpoints(run_dir)]
    if not which:
        path, what = run_dir / "adapter", f"the final adapter of run {run['id']}"
    elif which == "best":
        path, what = run_dir / "best", f"the best checkpoint of run {run['id']}"
    else:
        name = which if which.startswith("step-") else f"step-{int(which):06d}" if which.isdigit() else which
        if not _CHECKPOINT_NAME.fullmatch(name):  # '../..', an absolute path: a folder outside the run
            raise ConfigError(
                "init_adapter",
                f"{which!r} is no checkpoint of run {run['id']}: after RUN: give best, a step number (RUN:50) or a "
                "checkpoint's name (RUN:step-000050); for an adapter folder elsewhere give the folder itself"
                + (f" (its checkpoints: {', '.join(found)})" if found else ""),
            )
        path, what = checkpoint.checkpoints_dir(run_dir) / name, f"checkpoint {name} of run {run['id']}"
    if not _inside(path, run_dir):  # a symlink in the run pointing out of it
        raise ConfigError(
            "init_adapter", f"{path} leads out of run {run['id']}'s folder; give the adapter folder itself"
        )
    if not _is_adapter(path):
        hint = f"its checkpoints: {', '.join(run['id'] + ':' + n for n in found)}" if found else "it has none"
        raise ConfigError("init_adapter", f"run {run['id']} ({run['status']}) has no {what.split(' of ')[0]}; {hint}")
    return StartingAdapter(path, run["id"], what)


def load(base, start: StartingAdapter, config: TrainConfig, *, with_reference: bool):
    """The PEFT model with ``start`` as its trainable ``default`` adapter (and a frozen ``reference`` copy)."""
    from peft import PeftConfig, PeftModel

    if config.gradient_checkpointing:
        adapters.enable_checkpointing(base)
    if bottleneck.is_bottleneck_folder(start.path):  # the engine's own adapters: no frozen copy for a reference
        if with_reference:
            raise ConfigError(
                "init_adapter",
                f"{start.description} is a bottleneck adapter: starting this objective from it needs a frozen copy "
                "as the reference, which is made for PEFT adapters only; start from a LoRA run",
            )
        try:
            return bottleneck.load_bottlenecks(base, start.path, is_trainable=True)
        except ValueError as exc:
            raise ConfigError("init_adapter", f"{start.description} does not fit this model: {exc}") from None
    # The adapter's shape comes from its folder; dropout is this run's (0 by default, so DPO starts at ln 2).
    adapter_config = PeftConfig.from_pretrained(str(start.path))
    adapter_config.lora_dropout = config.lora_dropout
    try:
        model = PeftModel.from_pretrained(
            base, str(start.path), adapter_name="default", is_trainable=True, config=adapter_config
        )
        if with_reference:
            model.load_adapter(str(start.path), adapter_name=REFERENCE, is_trainable=False)
            model.set_adapter("default")
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch: an adapter made for another model
        raise ConfigError("init_adapter", f"{start.description} does not fit this model: {exc}") from None
    return model


def describe(start: StartingAdapter) -> str:
    if bottleneck.is_bottleneck_folder(start.path):
        b = bottleneck.BottleneckConfig.read(start.path)
        return f"Starting from {start.description}: {b.placement} bottleneck adapters (factor {b.reduction_factor})"
    cfg = json.loads((start.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":  # IA3, VeRA, bias tuning, prompt learning: their own settings
        return f"Starting from {start.description}: a {cfg['peft_type']} adapter (the method's settings are its own)"
    kind = "DoRA" if cfg.get("use_dora") else "LoRA"
    return (
        f"Starting from {start.description}: {kind} rank {cfg.get('r')}, alpha {cfg.get('lora_alpha')} "
        "(lora_rank, lora_alpha and target_modules of this config are not used)"
    )


@contextlib.contextmanager
def reference_adapter(model):
    """Run the model as the starting model: the frozen ``reference`` adapter active, no dropout; then back."""
    training = model.training
    model.set_adapter(REFERENCE, inference_mode=True)
    model.eval()
    try:
        yield
    finally:
        model.set_adapter("default")  # trainable again; the reference stays frozen
        model.train(training)
