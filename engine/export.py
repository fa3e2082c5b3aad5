"""Export a run's adapter in PEFT's format, loadable by ``PeftModel.from_pretrained`` unchanged.

A completed run exports its final adapter; a stopped, interrupted or failed run its newest checkpoint
(``core.run_status.is_exportable``, the rule the studio's buttons follow too). The folder
is written under a temporary name and renamed, so a failed export never looks like a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from finetune_studio.core.run_status import export_refusal, is_exportable
from finetune_studio.core.store import Store
from finetune_studio.engine import checkpoint

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(ValueError):
    """The export cannot be made; the message says why."""


def find_adapter(run_ref: str) -> tuple[Path, dict]:
    """(adapter folder, run row or {}) for a run id, id prefix or run folder."""
    store = Store()
    try:
        run = store.find_run(run_ref)
    finally:
        store.close()
    run_dir = Path(run["run_dir"]) if run else Path(run_ref)
    if not run and not (run_dir / "config.json").is_file():
        raise ExportError(f"no run named {run_ref!r}: give a run id from the runs list or a run folder")
    if run and not is_exportable(run.get("status")):
        raise ExportError(f"run {run['id']} has no adapter to export: {export_refusal(run.get('status'))}")
    final = run_dir / "adapter"
    if all((final / f).is_file() for f in ADAPTER_FILES):
        return final, run or {}
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        return latest, run or {}
    status = run.get("status", "unknown") if run else "unknown"
    raise ExportError(f"run {run_ref} ({status}) has no adapter yet: it saved no checkpoint before it ended")


def export_adapter(run_ref: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    source, run = find_adapter(run_ref)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another folder or pass --force")
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    if base and not Path(base).exists() and "/" not in base:
        raise ExportError(f"the adapter's base model {base!r} is not on this machine")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, tmp / name)
    readme = source / "README.md"
    if readme.is_file():
        shutil.copy2(readme, tmp / "README.md")
    if run:
        (tmp / "training_config.json").write_text(run.get("config", "{}"), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
