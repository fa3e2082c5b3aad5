"""The mouse wheel scrolls the page, never a setting the pointer happens to pass over.

Qt's combo boxes and spin boxes take the wheel whenever the pointer is over them: a person scrolling a long form
changes whatever drop-down or number passes under the pointer, with no sign on screen. :func:`guard_wheel` makes
them take the wheel only once they have the keyboard focus (a click or Tab gives it; the wheel does not), and hands
the wheel to the scroll area around them otherwise, so the page scrolls on as the person meant.
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QAbstractScrollArea, QAbstractSpinBox, QApplication, QComboBox, QWidget

GUARDED = (QComboBox, QAbstractSpinBox)
_MARK = "wheelGuarded"


class WheelGuard(QObject):
    """An event filter for combo and spin boxes: the wheel goes to them only while they have the focus."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() != QEvent.Type.Wheel or not isinstance(watched, QWidget) or watched.hasFocus():
            return False
        area = scroll_area_of(watched)
        if area is None:
            event.ignore()  # not ours: a spontaneous wheel goes on to the parents, as if the box were not there
            return True
        wheel = event if isinstance(event, QWheelEvent) else None
        if wheel is not None:
            viewport = area.viewport()
            pos = viewport.mapFromGlobal(wheel.globalPosition().toPoint())
            QApplication.sendEvent(
                viewport,
                QWheelEvent(
                    pos.toPointF(),
                    wheel.globalPosition(),
                    wheel.pixelDelta(),
                    wheel.angleDelta(),
                    wheel.buttons(),
                    wheel.modifiers(),
                    wheel.phase(),
                    wheel.inverted(),
                ),
            )
        return True


def scroll_area_of(widget: QWidget) -> QAbstractScrollArea | None:
    """The nearest scroll area that holds ``widget`` (a combo box's own list is not one)."""
    parent = widget.parentWidget()
    while parent is not None:
        if isinstance(parent, QAbstractScrollArea) and not isinstance(parent, GUARDED):
            return parent
        parent = parent.parentWidget()
    return None


_guard: WheelGuard | None = None


def guard_wheel(root: QWidget) -> int:
    """Guard every combo and spin box in ``root`` (and ``root`` itself): strong focus (the wheel gives none) and
    the filter above. Safe to call again on the same widgets; returns how many were newly guarded."""
    global _guard
    if _guard is None:
        _guard = WheelGuard(QApplication.instance())
    widgets = [root] if isinstance(root, GUARDED) else []
    widgets += [w for w in root.findChildren(QWidget) if isinstance(w, GUARDED)]
    count = 0
    for widget in widgets:
        if widget.property(_MARK):
            continue
        widget.setProperty(_MARK, True)
        if widget.focusPolicy() == Qt.FocusPolicy.WheelFocus:
            widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        widget.installEventFilter(_guard)
        count += 1
    return count
