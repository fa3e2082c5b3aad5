"""Refuse to run on a Qt binding that corrupts Python's reference counts.

PySide6 6.12.0 on Python 3.11 returns ``None`` from every void method without
taking a reference (fine on 3.12+, where None is immortal): each call lowers
None's count until the interpreter aborts with "deallocating None", within
minutes of live charts. The probe below calls a void method and watches the
count, so any build with the defect is caught, whatever its version number.
"""

from __future__ import annotations

import sys

ADVICE = (
    "This PySide6 build ({version}) corrupts Python's reference count of None on Python "
    "{py} and would crash the app. Install another version, e.g. "
    "`pip install 'pyside6-essentials==6.11.3'` (or use Python 3.12 or newer)."
)


def binding_is_sound(calls: int = 50) -> bool:
    from PySide6.QtCore import QObject

    obj = QObject()
    before = sys.getrefcount(None)
    for _ in range(calls):
        obj.setObjectName("probe")
    return sys.getrefcount(None) - before > -calls // 2


def problem() -> str:
    """An explanation if the binding is unsound, else ''."""
    if binding_is_sound():
        return ""
    import PySide6

    return ADVICE.format(version=PySide6.__version__, py=".".join(map(str, sys.version_info[:2])))
