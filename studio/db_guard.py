"""At start-up: a damaged database is named, kept and, with the person's consent, replaced by a fresh one holding
every row SQLite can still read (``core.db_recovery``). Without this the app would open on an empty runs list
and fail later with "file is not a database"."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from finetune_studio.core import db_recovery, paths

Ask = Callable[[str, str], bool]  # (title, text) -> the person agreed
Tell = Callable[[str, str], None]


def ensure_database(ask: Ask, tell: Tell) -> bool:
    """True when the database is usable (it was fine, or it has just been recovered); False when the person
    declined, in which case nothing was touched."""
    path = paths.db_path()
    why = db_recovery.damage(path)
    if not why:
        return True
    text = (
        f"The database {path} is damaged ({why}).\n\n"
        "Finetune Studio can keep it as it is (renamed to "
        f"{path.name}.corrupt-<time>; nothing is deleted), start a fresh database and copy into it every row it can "
        "still read: runs, metrics, samples, prompts, candidates, comparisons, edits and snapshots. It then says, "
        "table by table, what came back.\n\nRecover into a fresh database now?"
    )
    if not ask("Damaged database", text):
        return False
    try:
        result = db_recovery.recover(path)
    except (OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or exc
        tell("Recovery failed", f"Could not recover {path}: {reason}. Nothing was deleted.")
        return False
    if result.complete:
        tell("Database recovered", f"Started a fresh database at {path}.\n\n{result.summary()}")
    else:  # the person must know that some labels or runs stay in the kept file only
        tell("Database recovered, not completely", f"Started a fresh database at {path}.\n\n{result.summary()}")
    return True


def ask_with_dialog(title: str, text: str) -> bool:
    from PySide6.QtWidgets import QMessageBox

    box = QMessageBox(QMessageBox.Icon.Warning, title, text)
    recover = box.addButton("Recover", QMessageBox.ButtonRole.AcceptRole)
    box.addButton("Quit", QMessageBox.ButtonRole.RejectRole)
    box.exec()
    return box.clickedButton() is recover


def tell_with_dialog(title: str, text: str) -> None:
    from PySide6.QtWidgets import QMessageBox

    QMessageBox.information(None, title, text)
