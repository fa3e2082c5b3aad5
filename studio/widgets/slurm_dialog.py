"""The runs page's "Save SLURM script…": how many machines and GPUs, then where the script goes.

The script comes from :func:`core.slurm.sbatch_script` (the engine's ``slurm`` command prints the same): one
torchrun agent per node, a c10d rendezvous on the job's first node, the run's config saved beside the script.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QSpinBox, QWidget

from finetune_studio.core import paths
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.slurm import sbatch_script
from finetune_studio.studio.widgets.wheel_guard import guard_wheel


@dataclass(frozen=True)
class SlurmOptions:
    """What the script asks SLURM for (see ``core.slurm.sbatch_script``)."""

    nodes: int = 2
    gpus_per_node: int = 8
    time: str = "24:00:00"
    partition: str = ""
    home: str = ""  # FINETUNE_STUDIO_HOME on a file system every node sees ('' keeps the nodes' own)


class SlurmDialog(QDialog):
    def __init__(self, run_name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("SLURM script")
        self.nodes = QSpinBox(self)
        self.nodes.setRange(1, 1024)
        self.nodes.setValue(SlurmOptions.nodes)
        self.gpus = QSpinBox(self)
        self.gpus.setRange(1, 64)
        self.gpus.setValue(SlurmOptions.gpus_per_node)
        self.time = QLineEdit(SlurmOptions.time, self)
        self.partition = QLineEdit(self)
        self.partition.setPlaceholderText("the cluster's default")
        self.home = QLineEdit(self)
        self.home.setPlaceholderText("a shared folder for the run (FINETUNE_STUDIO_HOME)")
        form = QFormLayout(self)
        note = QLabel(
            f"Trains the config of {run_name!r} on several machines: one torchrun agent per node, one process per "
            "GPU. The model, the dataset and the run folder must be at the same paths on every node.",
            self,
        )
        note.setWordWrap(True)
        form.addRow(note)
        form.addRow("Machines (nodes)", self.nodes)
        form.addRow("GPUs per machine", self.gpus)
        form.addRow("Time limit", self.time)
        form.addRow("Partition", self.partition)
        form.addRow("Studio home", self.home)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        guard_wheel(self)

    def options(self) -> SlurmOptions:
        return SlurmOptions(
            nodes=self.nodes.value(),
            gpus_per_node=self.gpus.value(),
            time=self.time.text().strip() or SlurmOptions.time,
            partition=self.partition.text().strip(),
            home=self.home.text().strip(),
        )


def ask_slurm_options(parent: QWidget, run_name: str) -> SlurmOptions | None:
    dialog = SlurmDialog(run_name, parent)
    return dialog.options() if dialog.exec() == QDialog.DialogCode.Accepted else None


def save_slurm_script(script: Path, config: dict, options: SlurmOptions) -> Path:
    """Write ``config`` as ``<stem>.config.json`` beside ``script`` and the sbatch script that trains it, each
    atomically (temp + rename). ConfigError for a config that no longer validates, OSError if not writable.
    Returns the config's path."""
    cfg = TrainConfig.from_dict(config)  # the run's config, checked as the engine will
    config_path = script.with_name(f"{script.stem}.config.json")
    if config_path == script:
        raise ConfigError("script", f"choose another name than {script.name} for the script")
    text = sbatch_script(
        str(config_path),
        nodes=options.nodes,
        gpus_per_node=options.gpus_per_node,
        job_name=_job_name(cfg.display_name),
        time=options.time,
        partition=options.partition,
        home=options.home,
    )
    paths.atomic_write_text(config_path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    paths.atomic_write_text(script, text)
    os.chmod(script, 0o755)
    return config_path


def _job_name(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")
    return f"finetune-{safe}"[:64] if safe else "finetune-studio"
