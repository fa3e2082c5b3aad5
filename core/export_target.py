"""Where an export goes, and when an existing folder may be replaced.

An export folder carries a marker file listing every file the export wrote. Replacing a folder is allowed
only when it is such a previous export and holds nothing else: the data directory, its parents, home
folders and any non-empty folder that is not an export are refused, with the reason. Pure Python, so the
studio can check a place before it starts the engine.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from finetune_studio.core import paths

MARKER = ".finetune-studio-export.json"
MARKER_KIND = "finetune-studio-export"
MARKER_VERSION = 1


class ExportTargetError(ValueError):
    """The folder cannot take an export; the message says why and what to do."""


def exports_dir() -> Path:
    return paths.data_dir() / "exports"


def safe_name(text: str) -> str:
    """A folder name made of letters, digits, dots, dashes and underscores."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name[:80] or "export"


def default_export_dir(run_name: str, checkpoint_label: str) -> Path:
    """``<data dir>/exports/<run>-<checkpoint>``, e.g. ``exports/my-run-step-000050``."""
    return exports_dir() / safe_name(f"{run_name}-{checkpoint_label}")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a previous export, or None when ``folder`` is not one."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != MARKER_KIND or not isinstance(data.get("files"), list):
        return None
    return data


def marker_text(files: list[str], **extra: Any) -> str:
    return json.dumps({"kind": MARKER_KIND, "version": MARKER_VERSION, "files": sorted(files), **extra}, indent=1)


def _protected() -> list[tuple[Path, str]]:
    """Folders that are never replaced, whatever they hold, with the reason shown."""
    out: list[tuple[Path, str]] = []
    data = paths.data_dir().resolve()
    out.append((data, "it is the studio's data directory (database, runs, models)"))
    out.extend((p, "it holds the studio's data directory") for p in data.parents)
    try:
        home = Path.home().resolve()
    except RuntimeError:
        home = None
    if home is not None:
        out.append((home, "it is a home folder"))
        out.extend((p, "it holds a home folder") for p in home.parents)
    return out


def _files_under(folder: Path) -> list[str]:
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found.extend(str(rel / f) if str(rel) != "." else f for f in files)
        found.extend(str(rel / d) + "/" for d in dirs if os.path.islink(os.path.join(root, d)))
    return found


def check_target(out: str | Path, *, force: bool) -> Path:
    """The resolved folder to write, after refusing any place where writing could remove someone's data.

    Allowed: a folder that does not exist yet, an empty folder, or (with ``force``) a previous export that
    holds only the files it wrote.
    """
    out = Path(out).expanduser().resolve()
    for place, why in _protected():
        if out == place:
            raise ExportTargetError(f"will not export into {out}: {why}. Choose a new folder, e.g. {out / 'my-export'}")
    if out.parent == out:
        raise ExportTargetError(f"will not export into {out}: it is the root of the file system")
    if out.exists() and not out.is_dir():
        raise ExportTargetError(f"{out} is a file, not a folder; choose a folder name for the export")
    if not out.exists() or not any(out.iterdir()):
        return out
    marker = read_marker(out)
    if marker is None:
        raise ExportTargetError(
            f"{out} is not empty and is not a previous export (it has no {MARKER}); nothing in it was touched. "
            f"Choose a new or empty folder"
        )
    extra = sorted(set(_files_under(out)) - set(marker["files"]) - {MARKER})
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ExportTargetError(
            f"{out} is a previous export but also holds files the export did not write ({shown}); "
            f"move them out or choose another folder"
        )
    if not force:
        raise ExportTargetError(
            f"{out} is not empty: it holds a previous export; replace it (--force) or choose another folder"
        )
    return out
