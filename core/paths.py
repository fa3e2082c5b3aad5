"""Where the studio keeps its data: database, runs, converted models.

``$FINETUNE_STUDIO_HOME`` wins when set (the tests point it at a temporary
folder); otherwise the platform's user data directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

ENV_HOME = "FINETUNE_STUDIO_HOME"


PRIVATE_DIR = 0o700  # the data home and its folders: other local users can neither list nor enter them
PRIVATE_FILE = 0o600  # the database: read and written by its owner alone


def data_dir() -> Path:
    """The data home, created owner-only (0700); an existing one readable by others is made so."""
    env = os.environ.get(ENV_HOME)
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("finetune-studio", appauthor=False))
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """``path`` as a folder of its owner's alone: created with mode 0700 (parents as usual), and an existing folder
    of this user's that others may read or enter is closed to them."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    _restrict(path)
    return path


def _restrict(path: Path) -> None:
    """Take the group's and others' permissions off ``path`` when it is this user's."""
    try:
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, st.st_mode & 0o7700)
    except (OSError, AttributeError):  # another user's, a file system without modes, or no getuid (Windows)
        pass


def db_path() -> Path:
    """The database file, created empty (a valid empty SQLite database) and owner-only (0600) when missing, so SQLite
    opens it with that mode and gives its -wal and -shm files the same; an existing one is made owner-only."""
    path = data_dir() / "studio.sqlite3"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE))
    except FileExistsError:
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            if (path.parent / name).is_file():
                _restrict(path.parent / name)
    return path


def runs_dir() -> Path:
    return private_dir(data_dir() / "runs")


def stored_run_dir(folder: str | Path, home: Path | None = None) -> str:
    """How the database records a path of a run (its folder, its adapter): relative to the data home when it lies
    inside it (``runs/<id>``), so that a copied or moved home still finds its runs; absolute otherwise ('' stays '')."""
    if folder == "":
        return ""
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
    return private_dir(data_dir() / "models")


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
    """Write ``text`` to ``path`` so that a crash never leaves a half-written file under its final name.

    The temporary file has a fresh name in the target's folder, created by this call alone (``mkstemp``: O_EXCL, so a
    symlink planted there is never written through); the file then gets the mode a new file gets here (umask)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if hasattr(os, "fchmod"):  # mkstemp made it 0600
                os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it; else set and put back)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
