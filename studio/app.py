"""Create the application and the main window."""

from __future__ import annotations

import sys
from typing import cast

from PySide6.QtWidgets import QApplication

from finetune_studio.studio import db_guard, theme
from finetune_studio.studio.main_window import MainWindow
from finetune_studio.studio.services import jobs


def create_app(argv: list[str] | None = None) -> QApplication:
    app = cast(QApplication, QApplication.instance() or QApplication(list(argv if argv is not None else sys.argv)))
    app.setApplicationName("Finetune Studio")
    app.setOrganizationName("finetune-studio")
    app.setDesktopFileName("finetune-studio")
    theme.apply_theme(app)
    theme.follow_system(app)
    return app


def run(argv: list[str] | None = None) -> int:
    from finetune_studio.studio import compat

    trouble = compat.problem()
    if trouble:
        sys.stderr.write(f"finetune-studio: {trouble}\n")
        return 1
    app = create_app(argv)
    if not db_guard.ensure_database(db_guard.ask_with_dialog, db_guard.tell_with_dialog):
        sys.stderr.write("finetune-studio: the database is damaged and was left as it is\n")
        return 1
    window = MainWindow()
    window.show()
    code = app.exec()
    jobs.drain_orphans()
    window.generation_worker.drain()
    return code
