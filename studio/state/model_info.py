"""Facts about a model read straight from its files (pure JSON), so local folders need no engine call.

The engine's ``model info`` command does the same for everything (and converts
GGUF files); the studio uses this module for folders it can read at once and
asks the engine for the rest.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from finetune_studio.core.model_spec import SpecKind, cached_snapshot, converted_folder, parse_spec
from finetune_studio.core.protocol.events import ModelReady


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


def describe_folder(folder: Path, name: str = "") -> ModelReady:
    """Shape facts from config.json and the safetensors headers (no tensor is read)."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = cfg.get("text_config", cfg)
    return ModelReady(
        name=name or folder.name,
        path=str(folder),
        architecture=(cfg.get("architectures") or [""])[0],
        parameters=count_parameters(folder),
        layers=int(text.get("num_hidden_layers", 0) or 0),
        hidden_size=int(text.get("hidden_size", 0) or 0),
        vocab_size=int(text.get("vocab_size", 0) or 0),
        context_length=int(text.get("max_position_embeddings", 0) or 0),
        dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or text.get("torch_dtype") or ""),
    )


def count_parameters(folder: Path) -> int:
    """Sum of tensor sizes over *.safetensors headers: 8 bytes of length, then a JSON header."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > 100_000_000:
                    continue
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            continue
        for key, value in header.items():
            if key == "__metadata__" or not isinstance(value, dict):
                continue
            n = 1
            for d in value.get("shape", []):
                n *= int(d)
            total += n
    return total


def format_count(n: int) -> str:
    if not n:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)
