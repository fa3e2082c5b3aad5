"""Presets: named partial configs in ``resources/presets/*.yaml`` (or ``*.json``).

Each file holds ``name``, ``description`` and ``config`` (TrainConfig fields).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune_studio.core import paths


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict
    path: Path


def presets_dir() -> Path:
    return paths.resources_dir() / "presets"


def load_presets(folder: Path | None = None) -> list[Preset]:
    """Every readable preset, sorted by file name; a broken file is skipped (its test catches it)."""
    out = []
    for path in sorted((folder or presets_dir()).glob("*")):
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            continue
        try:
            preset = read_preset(path)
        except (OSError, ValueError, yaml.YAMLError):
            continue
        out.append(preset)
    return out


def read_preset(path: Path) -> Preset:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path.name}: a preset needs a 'config' mapping")
    return Preset(str(data.get("name") or path.stem), str(data.get("description") or ""), data["config"], path)
