"""What a model spec is, and where the Hugging Face caches are: the one definition the engine and the studio share.

A model spec is what a person types in the model field or ``model:`` in a config. It is one of:

    ``default``      the bundled SmolLM2-135M-Instruct (a GGUF file the engine converts once)
    ``*.gguf``       a GGUF file, converted once into a safetensors folder under the studio's data directory
    a folder         a local Hugging Face model folder (config.json and weights)
    ``owner/name``   a hub id already in the local Hugging Face cache (nothing is ever downloaded)

:func:`parse_spec` says which, looking only at the text and whether such a path exists. Reading the model is
the engine's business; this module is pure Python (no huggingface_hub, no torch), so that the studio and the
memory estimator can use it too.

The cache folders are found as ``huggingface_hub`` and ``datasets`` find them: ``HF_HUB_CACHE`` (or the legacy
``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, where ``HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface``
and ``XDG_CACHE_HOME`` to ``~/.cache``; ``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from finetune_studio.core import paths

DEFAULT_SPEC = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CONVERTED = "smollm2-135m-instruct"  # the folder under models_dir() the bundled model is converted into
CONVERTED_MARK = ".converted-ok"  # written last into a converted folder: a folder without it is half-done
# owner/name as the hub spells repository ids (no leading '.', '~' or '/'; no spaces or colons).
REPO_ID = re.compile(r"^([A-Za-z0-9][\w.-]*)/([\w.-]+)$")


class SpecKind(StrEnum):
    DEFAULT = "default"
    GGUF = "gguf"
    FOLDER = "folder"
    HUB = "hub"
    FILE = "file"  # an existing file that is neither a .gguf nor a folder (a config.json, a weights file...)
    MISSING = "missing"  # no such path, and not a hub id


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as given, stripped
    kind: SpecKind
    path: Path | None = None  # GGUF, FOLDER, FILE: the path (user folder expanded)
    repo_id: str = ""  # HUB: owner/name


def parse_spec(spec: str) -> ModelSpec:
    """Classify ``spec``; the order settles ambiguities: 'default', then .gguf, then an existing path, then a hub id."""
    text = (spec or "").strip()
    if text == DEFAULT_SPEC:
        return ModelSpec(text, SpecKind.DEFAULT)
    if not text:
        return ModelSpec(text, SpecKind.MISSING)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        return ModelSpec(text, SpecKind.GGUF, path)
    if path.is_dir():
        return ModelSpec(text, SpecKind.FOLDER, path)
    if path.exists():
        return ModelSpec(text, SpecKind.FILE, path)
    if is_repo_id(text):
        return ModelSpec(text, SpecKind.HUB, repo_id=text)
    return ModelSpec(text, SpecKind.MISSING, path)


def is_repo_id(text: str) -> bool:
    return REPO_ID.match(text) is not None


def converted_folder(spec: ModelSpec) -> Path | None:
    """Where the engine keeps (or will keep) the safetensors conversion of a DEFAULT or GGUF spec; else None.

    A GGUF file's folder is keyed by its resolved path, size and modification time, so an edited file is
    converted again."""
    if spec.kind == SpecKind.DEFAULT:
        return paths.models_dir() / DEFAULT_CONVERTED
    if spec.kind == SpecKind.GGUF and spec.path is not None and spec.path.is_file():
        st = spec.path.stat()
        digest = hashlib.sha256(f"{spec.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
        return paths.models_dir() / f"{spec.path.stem}-{digest}"
    return None


# --- the Hugging Face caches -----------------------------------------------------------------------


def _env_path(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hf_home() -> Path:
    """``HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``."""
    if os.environ.get("HF_HOME"):
        return _env_path(os.environ["HF_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return _env_path(os.path.join(xdg, "huggingface"))


def hub_cache_dir() -> Path:
    """The hub cache (models and raw dataset files), as ``huggingface_hub.constants.HF_HUB_CACHE`` finds it."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return _env_path(os.environ[name])
    return hf_home() / "hub"


def datasets_cache_dir() -> Path:
    """The ``datasets`` library's processed cache (``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return _env_path(os.environ["HF_DATASETS_CACHE"])
    return hf_home() / "datasets"


def hub_repo_dir(repo_id: str, repo_type: str = "model") -> Path:
    """A repository's folder in the hub cache: ``models--owner--name`` (or ``datasets--``...)."""
    return hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cached_snapshot(repo_id: str, repo_type: str = "model", needs: str = "") -> Path | None:
    """The cached snapshot ``huggingface_hub`` would use offline: the one ``refs/main`` names, else the newest.

    ``needs``: a file the snapshot must hold (e.g. ``config.json``); None when no snapshot qualifies."""
    repo = hub_repo_dir(repo_id, repo_type)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None

    def ok(snap: Path) -> bool:
        return snap.is_dir() and (not needs or (snap / needs).is_file())

    ref = repo / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text(encoding="utf-8").strip()
        if ok(named):
            return named
    found = sorted((p for p in snapshots.iterdir() if ok(p)), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
