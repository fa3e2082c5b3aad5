"""Checkpoints of a run on several processes, through ``torch.distributed.checkpoint`` (DCP).

Layout of ``<run_dir>/checkpoints/step-000050/`` (beside the one-process layout of :mod:`engine.checkpoint`):

- ``dcp/``: the trainable weights and the optimizer state, each rank writing its part (its shards under FSDP;
  DCP writes replicated DDP tensors once). Keys are the canonical parameter names, so DDP and FSDP checkpoints
  are one format, loadable by any number of processes (DCP reshards) and by one process;
- ``adapter_config.json`` + ``adapter_model.safetensors``: the full adapter in PEFT's format, written by rank 0,
  so that export and inspection see a distributed checkpoint like any other;
- ``schedule_state.pt`` (scheduler, loss scaler), ``rng-rank<r>.pt`` (each rank's RNG), ``trainer_state.json``.

All ranks write into one temporary folder, which rank 0 renames once every rank is done (the run folder must be
on a file system every node sees). The two newest checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from finetune_studio.engine.checkpoint import KEEP, TrainerState, checkpoints_dir, list_checkpoints

DCP_DIR = "dcp"


def is_distributed(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _options():
    """Trainable weights only; loading them leaves the frozen base as loaded (hence not strict). A missing
    trainable weight still fails: ``dcp.load`` refuses a key the checkpoint lacks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(
    run_dir: Path, module, peft_model, optimizer, scheduler, state: TrainerState, ranks, scaler=None, extra=None
):
    """Every rank calls this at the same step; returns the checkpoint's folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoints_dir(run_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    torch.save(_rng_state(), tmp / f"rng-rank{ranks.rank}.pt")
    weights = ranks.full_trainable_state(peft_model)  # collective under FSDP
    if ranks.is_main:
        peft_model.save_pretrained(tmp, state_dict=weights)
        torch.save(
            {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
            tmp / "schedule_state.pt",
        )
        (tmp / "trainer_state.json").write_text(
            json.dumps({**asdict(state), "world_size": ranks.world_size}), encoding="utf-8"
        )
        if extra is not None:
            extra(tmp)  # the objective's own files
    ranks.barrier()  # every rank's files are in
    if ranks.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()  # no rank reads or writes checkpoints before the rename
    return final


def load_checkpoint(path: Path, module, optimizer, scheduler, rank: int = 0, scaler=None) -> TrainerState:
    """Load into ``module`` (the wrapped training forward, or ``LogpsModule(model)`` in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process reading a distributed checkpoint is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options()
    )
    blob = torch.load(path / "schedule_state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    rng = path / f"rng-rank{rank}.pt"
    if rng.is_file():  # absent when resuming with more processes than saved: those ranks keep their seed
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    data = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return TrainerState(step=data["step"], consumed=data["consumed"], run_id=data["run_id"])


def _rng_state() -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(blob: dict) -> None:
    torch.set_rng_state(blob["cpu"])
    if blob.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["cuda"])
