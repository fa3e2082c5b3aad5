"""Resumable checkpoints: adapter, optimizer, scheduler, RNG state and data position.

Layout of ``<run_dir>/checkpoints/step-000050/``: ``adapter_config.json`` + ``adapter_model.safetensors``
(PEFT's format; a full fine-tune's whole model folder instead, ``engine.train.methods.full``),
``training_state.pt`` (optimizer, scheduler, RNG) and ``trainer_state.json`` (step, examples consumed). A
checkpoint is written to a temporary folder and renamed, so a crash never leaves a half-written checkpoint under its
final name. The two newest are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

KEEP = 2


@dataclass
class TrainerState:
    step: int
    consumed: int  # examples consumed by the sampler
    run_id: str
    first_batch: list = field(default_factory=list)  # the examples put first (longest batch first), if any
    # Early stopping: the best eval loss so far, its step, and evaluations since it without improvement.
    best_eval_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    # What chose the best evaluation, lower being better: its eval loss, or minus an objective's figure (a reward).
    best_score: float | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    state: TrainerState,
    scaler=None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint; ``extra(folder)`` adds files of the objective's own before the folder is renamed."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = private_temp_dir(root, f".tmp-{final.name}-")
    save_adapter(model, tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "prompt_encoder": _prompt_encoder_state(model),
        },
        tmp / "training_state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    if extra is not None:
        extra(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def private_temp_dir(folder: Path, prefix: str) -> Path:
    """A new folder in ``folder`` to write into before its rename: a fresh name made by this call alone (mkdtemp,
    mode 0700; a fixed name could be a symlink planted there), ending in ``-<pid>`` so that
    :func:`clean_leftovers` tells this process's folders from those a killed one left."""
    return Path(tempfile.mkdtemp(dir=folder, prefix=prefix, suffix=f"-{os.getpid()}"))


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary folders a killed process left in ``run_dir`` (checkpoints and adapter being written),
    and put back an adapter that was moved aside while being replaced. Call only while no other process writes
    this run (a run is started or resumed only when it is not running). Returns what was removed."""
    run_dir = Path(run_dir)
    mine = f"-{os.getpid()}"
    removed = []
    adapter = run_dir / "adapter"
    for old in sorted(run_dir.glob(".adapter-old-*")):
        if not adapter.exists():
            os.replace(old, adapter)  # killed between moving the old adapter aside and putting the new one
        elif not old.name.endswith(mine):
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for tmp in [*run_dir.glob(".adapter-tmp-*"), *checkpoints_dir(run_dir).glob(".tmp-*")]:
        if tmp.is_dir() and not tmp.name.endswith(mine):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def save_adapter(model, folder: Path, state_dict: dict | None = None) -> None:
    """The trained adapter only, in PEFT's format (a DPO run's frozen 'reference' copy is not saved).
    ``state_dict``: the adapter's full weights when the model itself holds only a shard of them (FSDP)."""
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(folder, selected_adapters=["default"], **extra)


def _prompt_encoder_state(model) -> dict | None:
    """P-tuning's encoder weights: PEFT saves only the prompt embeddings it produces (enough to use the adapter),
    so a checkpoint keeps the encoder itself to resume training it."""
    config = getattr(model, "active_peft_config", None)
    if str(getattr(config, "peft_type", "")) not in ("P_TUNING", "PeftType.P_TUNING"):
        return None
    return {k: v.detach().cpu() for k, v in model.prompt_encoder.state_dict().items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file()
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> TrainerState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if hasattr(model, "load_saved_folder"):  # a whole model saved (engine.train.methods.full)
        model.load_saved_folder(path)
    elif hasattr(model, "load_adapter_weights"):  # adapters of the engine's own (engine.bottleneck)
        model.load_adapter_weights(load_file(str(path / "adapter_model.safetensors")))
    else:
        weights = load_file(str(path / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if unexpected:
            raise ValueError(f"checkpoint {path} does not match this adapter ({unexpected[:3]})")
    blob = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    if blob.get("prompt_encoder"):
        model.prompt_encoder.load_state_dict(blob["prompt_encoder"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return TrainerState(**json.loads((path / "trainer_state.json").read_text(encoding="utf-8")))
