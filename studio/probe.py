"""A read-only look at the window for the end-to-end tests: off unless ``FINETUNE_STUDIO_E2E_PROBE`` names a folder.

The tests drive the app only through the window system (keys and clicks sent to the X server); to know *where* to
click they ask the app for its named widgets' places on screen. They write ``request`` (any text) into the folder;
within a tenth of a second the app answers with ``state.json``: every visible widget that has an object name, its
global rectangle, whether it is enabled and has focus (and, a checkable button, whether it is checked), and its text
(a table: its rows' rectangles and texts); the window's geometry and the screen's; the tabs shown; the current tab;
the status bar's message. Nothing here changes the app.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PySide6.QtCore import QPoint, QRect, QTimer
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMenu,
    QPlainTextEdit,
    QProgressBar,
    QTabBar,
    QTableView,
    QTabWidget,
    QTextEdit,
    QWidget,
)

from finetune_studio.core.paths import atomic_write_text

ENV = "FINETUNE_STUDIO_E2E_PROBE"


def install(window: QMainWindow) -> None:
    """Answer the tests' requests while the window lives (only when the environment variable is set)."""
    folder = os.environ.get(ENV, "")
    if not folder:
        return
    timer = QTimer(window, interval=100)
    timer.timeout.connect(lambda: _answer(window, Path(folder)))
    timer.start()


def _answer(window: QMainWindow, folder: Path) -> None:
    request = folder / "request"
    try:
        rid = request.read_text(encoding="utf-8").strip()
    except OSError:
        return
    request.unlink(missing_ok=True)
    state = describe(window)
    state["request"] = rid
    atomic_write_text(folder / "state.json", json.dumps(state, ensure_ascii=False))


def _rect(w: QWidget) -> list[int]:
    p = w.mapToGlobal(QPoint(0, 0))
    return [p.x(), p.y(), w.width(), w.height()]


def _visible(w: QWidget) -> list[int]:
    """The part of the widget not clipped by a scroll area or its parents (what a click can reach): its rectangle cut
    by every parent's up to the window. (``visibleRegion`` would also cut out the widget's own opaque children, so a
    chart or a scroll area, whose insides are such children, would look clipped when it is not.)"""
    r = QRect(w.mapToGlobal(QPoint(0, 0)), w.size())
    parent = w if not w.isWindow() else None
    while parent is not None and not parent.isWindow():
        parent = parent.parentWidget()
        if parent is None:
            break
        r = r.intersected(QRect(parent.mapToGlobal(QPoint(0, 0)), parent.size()))
    if r.isEmpty():
        return [0, 0, 0, 0]
    return [r.x(), r.y(), r.width(), r.height()]


def _text(w: QWidget) -> str | None:
    if isinstance(w, (QLabel, QAbstractButton, QLineEdit)):
        return w.text()
    if isinstance(w, (QPlainTextEdit, QTextEdit)):
        return w.toPlainText()
    if isinstance(w, QComboBox):
        return w.currentText()
    if isinstance(w, QAbstractSpinBox):
        return w.text()
    if isinstance(w, QProgressBar):
        return f"{w.value()}/{w.maximum()}"
    return None


def _rows(table: QTableView, most: int = 50) -> list[dict]:
    """The table's rows in view: each one's global rectangle (the row across the viewport) and its cells' text."""
    model, viewport = table.model(), table.viewport()
    rows = []
    if model is None:
        return rows
    for row in range(min(model.rowCount(), most)):
        y, height = table.rowViewportPosition(row), table.rowHeight(row)
        if y < 0 or height <= 0 or y >= viewport.height():
            continue
        p = viewport.mapToGlobal(QPoint(0, y))
        cells = [model.index(row, col).data() for col in range(model.columnCount())]
        rows.append(
            {
                "rect": [p.x(), p.y(), viewport.width(), height],
                "cells": ["" if c is None else str(c) for c in cells],
                "selected": table.selectionModel().isRowSelected(row, table.rootIndex()),
            }
        )
    return rows


def _current_tab(window: QMainWindow) -> str | None:
    central = window.centralWidget()
    if isinstance(central, QTabWidget):
        return central.tabText(central.currentIndex())
    return None


def describe(window: QMainWindow) -> dict:
    widgets: dict[str, dict] = {}
    tops = [window] + [t for t in QApplication.topLevelWidgets() if t is not window and t.isVisible()]
    for top in tops:
        for w in [top] + top.findChildren(QWidget):
            name = w.objectName()
            if not name or name.startswith("qt_") or not w.isVisible() or name in widgets:
                continue
            widgets[name] = {
                "class": type(w).__name__,
                "rect": _rect(w),
                "visible": _visible(w),
                "enabled": w.isEnabled(),
                "focus": w.hasFocus(),
                "text": _text(w),
            }
            if isinstance(w, QTableView):
                widgets[name]["rows"] = _rows(w)
            if isinstance(w, QAbstractButton) and w.isCheckable():
                widgets[name]["checked"] = w.isChecked()
    tabs = []
    for bar in window.findChildren(QTabBar):
        if bar.isVisible():
            for i in range(bar.count()):
                if not bar.isTabVisible(i):
                    continue
                r = bar.tabRect(i)
                p = bar.mapToGlobal(r.topLeft())
                tabs.append({"text": bar.tabText(i), "rect": [p.x(), p.y(), r.width(), r.height()]})
    menus = []
    for menu in QApplication.topLevelWidgets():
        if isinstance(menu, QMenu) and menu.isVisible():
            for action in menu.actions():
                r = menu.actionGeometry(action)
                p = menu.mapToGlobal(r.topLeft())
                menus.append({"text": action.text(), "rect": [p.x(), p.y(), r.width(), r.height()]})
    focus = QApplication.focusWidget()
    frame, screen = window.frameGeometry(), window.screen().availableGeometry()
    return {
        "window": {
            "rect": [frame.x(), frame.y(), frame.width(), frame.height()],
            "minimum": [window.minimumSizeHint().width(), window.minimumSizeHint().height()],
            "active": window.isActiveWindow(),
        },
        "screen": [screen.x(), screen.y(), screen.width(), screen.height()],
        "focus": {"name": focus.objectName(), "class": type(focus).__name__} if focus is not None else None,
        "tabs": tabs,
        "current_tab": _current_tab(window),
        "status": window.statusBar().currentMessage(),
        "menus": menus,
        "widgets": widgets,
    }
