"""The memory budget: what the run needs (estimate, then live use and peak) against what the device has."""

from __future__ import annotations

import html

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPalette
from PySide6.QtWidgets import QGroupBox, QLabel, QSizePolicy, QVBoxLayout, QWidget

from finetune_studio.studio.state.run import MemoryState, format_bytes

BUDGET = QColor(70, 130, 220)
USED = QColor(60, 170, 110)
OVER = QColor(220, 80, 60)


class MemoryBar(QWidget):
    """A horizontal bar scaled to the device: budget (outline), used (fill), peak (tick)."""

    def __init__(self, state: MemoryState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.setMinimumHeight(22)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        state.subscribe(lambda _topic: self.update())

    def sizeHint(self) -> QSize:
        return QSize(240, 22)

    def paintEvent(self, _event) -> None:
        st = self.state
        est = st.estimate
        scale_to = max(est.device_total_bytes, est.total_bytes, st.peak_bytes, 1)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = QRectF(self.rect()).adjusted(1, 1, -1, -1)
        p.setPen(self.palette().color(QPalette.ColorRole.Mid))
        p.setBrush(self.palette().color(QPalette.ColorRole.Base))
        p.drawRoundedRect(r, 4, 4)
        over = not est.fits or (est.device_total_bytes and est.total_bytes > est.device_total_bytes)

        def width(n: int) -> float:
            return r.width() * min(1.0, n / scale_to)

        if est.total_bytes:
            color = OVER if over else BUDGET
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(QColor(color.red(), color.green(), color.blue(), 90))
            p.drawRoundedRect(QRectF(r.left(), r.top(), width(est.total_bytes), r.height()), 4, 4)
        if st.used_bytes:
            p.setBrush(USED)
            p.drawRoundedRect(QRectF(r.left(), r.top() + 4, width(st.used_bytes), r.height() - 8), 3, 3)
        if st.peak_bytes:
            x = r.left() + width(st.peak_bytes)
            p.setPen(self.palette().color(QPalette.ColorRole.Text))
            p.drawLine(int(x), int(r.top()), int(x), int(r.bottom()))
        p.end()


class MemoryPanel(QGroupBox):
    def __init__(self, state: MemoryState, parent: QWidget | None = None):
        super().__init__("Memory budget", parent)
        self.state = state
        self.bar = MemoryBar(state, self)
        self.summary = QLabel(self)
        self.summary.setObjectName("memorySummary")
        self.summary.setWordWrap(True)
        self.parts = QLabel(self)
        self.parts.setObjectName("memoryParts")
        self.parts.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(self.bar)
        lay.addWidget(self.summary)
        lay.addWidget(self.parts)
        self.setToolTip(
            "Blue: the estimate made before the run. Green: in use now. Line: the peak so far. "
            "The whole bar is the device's memory."
        )
        state.subscribe(lambda _topic: self.refresh())
        self.refresh()

    def refresh(self) -> None:
        st, est = self.state, self.state.estimate
        lines = []
        if est.note:
            color = "" if est.fits else " style='color:#d0503c'"
            lines.append(f"<span{color}>{html.escape(est.note)}</span>")
        elif est.total_bytes:
            lines.append(
                f"Needs about <b>{format_bytes(est.total_bytes)}</b>"
                + (f" of {format_bytes(est.device_total_bytes)} free" if est.device_total_bytes else "")
            )
        if est.lengths:
            lines.append(f"<small>{html.escape(est.lengths)}</small>")
        if est.device_name:
            lines.append(f"Device: {html.escape(est.device_name)}")
        if st.used_bytes or st.peak_bytes:
            lines.append(f"In use {format_bytes(st.used_bytes)}, peak {format_bytes(st.peak_bytes)}")
        self.summary.setText("<br>".join(lines) or "–")
        self.parts.setText(", ".join(f"{k} {format_bytes(v)}" for k, v in est.parts.items()))
        self.parts.setVisible(bool(est.parts))
