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


def stored_run_dir(folder: str | Path, home: Path | None = None) -> str:
    """How the database records a path of a run (its folder, its adapter): relative to the data home when it lies
    inside it (``runs/<id>``), so that a copied or moved home still finds its runs; absolute otherwise."""
    folder = Path(folder)
    home = data_dir() if home is None else home
    try:
        return folder.resolve().relative_to(home.resolve()).as_posix()
    except ValueError:
        return str(folder)


def resolve_run_dir(stored: str, run_id: str, home: Path | None = None) -> str:
    """The run folder the database's ``run_dir`` means in the data home ``home`` (default :func:`data_dir`).

    A relative value is read from the home. An absolute one written by an older app (or in a home since copied or
    moved) that lies outside the home reads as ``<home>/runs/<run id>`` when that folder exists: the copy's run, not
    the old home's. Any other absolute value (a run kept elsewhere) is the stored one. '' stays ''."""
    if not stored:
        return stored
    home = data_dir() if home is None else home
    path = Path(stored)
    if not path.is_absolute():
        return str(home / path)
    if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
        return stored
    here = home / "runs" / run_id
    if here.is_dir() and not _inside(path, home):
        return str(here)
    return stored


def resolve_in_run(stored: str, stored_run_dir: str, run_dir: str, home: Path | None = None) -> str:
    """A path of a run (its adapter, its best checkpoint) as the database records it, in the run folder ``run_dir``
    that :func:`resolve_run_dir` found for the stored ``stored_run_dir``: relative values are read from the home,
    absolute ones inside the stored run folder move with it. '' stays ''."""
    if not stored:
        return stored
    home = data_dir() if home is None else home
    path = Path(stored)
    if not path.is_absolute():
        return str(home / path)
    if stored_run_dir and Path(stored_run_dir).is_absolute():
        try:
            return str(Path(run_dir) / path.relative_to(stored_run_dir))
        except ValueError:
            pass
    return stored


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


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
