"""Where the studio keeps its data: database, runs, converted models.

``$FINETUNE_STUDIO_HOME`` wins when set (the tests point it at a temporary
folder); otherwise the platform's user data directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_HOME = "FINETUNE_STUDIO_HOME"


def data_dir() -> Path:
    env = os.environ.get(ENV_HOME)
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("finetune-studio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path() -> Path:
    return data_dir() / "studio.sqlite3"


def runs_dir() -> Path:
    path = data_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Converted models (GGUF imports, the bundled default) live here."""
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def python_argv() -> list[str]:
    """This interpreter, started so that the working directory is not an import root (``-P``).

    A child started in a clone of the repository would otherwise see the clone's top-level folders
    (``kernels/``, ``core/`` ...) as top-level modules: transformers' ``import kernels``, meant for Hugging
    Face's package, would land in this project's code.
    """
    return [sys.executable, "-P"]


def drop_checkout_from_path() -> None:
    """Take the repository's root off ``sys.path`` (``python -m finetune_studio.engine`` run from a clone puts
    it first). The project itself is imported as ``finetune_studio.*`` and does not need it."""
    checkout = Path(__file__).resolve().parent.parent
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != checkout]


def resources_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "resources"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash never leaves a half-written file under its final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
