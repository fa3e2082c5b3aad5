"""Look and feel: the Fusion style, a light or dark palette that follows the system, the app's style sheet."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QIcon, QPalette
from PySide6.QtWidgets import QApplication

from finetune_studio.core import paths


def dark_palette() -> QPalette:
    p = QPalette()
    role, c = QPalette.ColorRole, QColor
    for r, color in (
        (role.Window, c(37, 38, 41)),
        (role.WindowText, c(225, 225, 225)),
        (role.Base, c(27, 28, 30)),
        (role.AlternateBase, c(45, 46, 50)),
        (role.ToolTipBase, c(50, 52, 56)),
        (role.ToolTipText, c(230, 230, 230)),
        (role.Text, c(225, 225, 225)),
        (role.Button, c(48, 50, 54)),
        (role.ButtonText, c(225, 225, 225)),
        (role.BrightText, c(255, 90, 90)),
        (role.Link, c(100, 160, 240)),
        (role.Highlight, c(60, 120, 210)),
        (role.HighlightedText, c(255, 255, 255)),
        (role.PlaceholderText, c(140, 140, 140)),
        (role.Mid, c(70, 72, 76)),
        (role.Dark, c(20, 20, 22)),
    ):
        p.setColor(r, color)
    for r in (role.Text, role.ButtonText, role.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, r, c(120, 120, 120))
    return p


def is_dark(app: QApplication) -> bool:
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def apply_theme(app: QApplication) -> None:
    """Fusion, then a dark palette when the system is dark (Fusion's own light palette otherwise)."""
    app.setStyle("Fusion")
    app.setPalette(dark_palette() if is_dark(app) else app.style().standardPalette())
    qss = paths.resources_dir() / "styles" / "studio.qss"
    if qss.is_file():
        app.setStyleSheet(qss.read_text(encoding="utf-8"))
    icon = paths.resources_dir() / "icons" / "finetune-studio.svg"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))


def follow_system(app: QApplication) -> None:
    """Re-apply the palette when the system switches between light and dark."""
    app.styleHints().colorSchemeChanged.connect(lambda _scheme: apply_theme(app))
