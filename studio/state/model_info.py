"""Facts about a model read straight from its files (pure JSON), so local folders need no engine call.

The engine's ``model info`` command gives the same description (``core.model_folder``) for everything (and converts
GGUF files); the studio uses this module for folders it can read at once and asks the engine for the rest.
"""

from __future__ import annotations

from pathlib import Path

from finetune_studio.core.model_folder import count_parameters as count_parameters
from finetune_studio.core.model_folder import describe_folder as describe_folder  # the engine's description too
from finetune_studio.core.model_spec import SpecKind, cached_snapshot, converted_folder, parse_spec


def local_folder(spec: str) -> Path | None:
    """The folder holding config.json for ``spec`` if it can be found without the engine, else None."""
    parsed = parse_spec(spec)
    if parsed.kind == SpecKind.DEFAULT:
        folder = converted_folder(parsed)
        assert folder is not None
        return folder if (folder / "config.json").is_file() else None  # converted by the engine already
    if parsed.kind == SpecKind.FOLDER:
        assert parsed.path is not None
        return parsed.path if (parsed.path / "config.json").is_file() else None
    if parsed.kind == SpecKind.HUB:
        return cached_snapshot(parsed.repo_id, needs="config.json")
    return None


def format_count(n: int) -> str:
    if not n:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)
