"""What a Hugging Face model folder holds, read straight from its files: the one description the engine's
``model info`` answers and the studio's model panel shows for a folder it can read at once.

Pure Python: ``config.json`` for the shape, and the safetensors headers (8 bytes of length, then a JSON header)
for the parameter count; no tensor is read, and neither torch nor safetensors is needed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from finetune_studio.core.protocol.events import ModelReady

MAX_HEADER_BYTES = 100_000_000  # a safetensors header larger than this is not one (a damaged or foreign file)


def describe_folder(folder: Path, name: str = "") -> ModelReady:
    """Shape facts from config.json (a multimodal model's ``text_config`` when it has one) and the parameter count
    from the safetensors headers."""
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
    """The sum of tensor sizes over the folder's ``*.safetensors`` headers (a tied head is stored once); a file
    whose header cannot be read counts nothing."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > MAX_HEADER_BYTES:
                    continue
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            continue
        if not isinstance(header, dict):
            continue
        for key, value in header.items():
            if key == "__metadata__" or not isinstance(value, dict):
                continue
            n = 1
            for d in value.get("shape", []):
                n *= int(d)
            total += n
    return total
