"""The label view: two answers side by side that take the labelling keys, and the edit / ranking box.

It shows what :class:`~studio.state.annotate.AnnotateState` holds and turns key presses into its :class:`Key`. It
shows when it has the keys (a coloured frame and "Keys work here"); clicking anywhere on it gives it the keys.
"""

from __future__ import annotations

import difflib
import html
import json
import re

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import (
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.annotate import SAID, AnnotateState, Key

KEYS_TEXT = (
    "<b>A</b> left better · <b>B</b> right better · <b>T</b> tie · <b>X</b> both bad · <b>S</b> skip · "
    "<b>E</b> / <b>Shift+E</b> edit left / right · <b>1-3</b> strength · <b>Ctrl+Z</b> undo · "
    "<b>→ J</b> next · <b>← K</b> previous · <b>M</b> Markdown · <b>D</b> word diff · <b>R</b> rank all (3+ answers)"
)
FOCUSED = "Keys work here."
UNFOCUSED = "Click the answers to label with the keys."
K = Qt.Key
KEYS = {
    K.Key_A: Key.LEFT,
    K.Key_B: Key.RIGHT,
    K.Key_T: Key.TIE,
    K.Key_X: Key.BOTH_BAD,
    K.Key_S: Key.SKIP,
    K.Key_R: Key.RANK,
    K.Key_E: Key.EDIT_LEFT,
    K.Key_1: Key.STRENGTH_1,
    K.Key_2: Key.STRENGTH_2,
    K.Key_3: Key.STRENGTH_3,
    K.Key_J: Key.NEXT,
    K.Key_Right: Key.NEXT,
    K.Key_Down: Key.NEXT,
    K.Key_K: Key.PREVIOUS,
    K.Key_Left: Key.PREVIOUS,
    K.Key_Up: Key.PREVIOUS,
    K.Key_M: Key.MARKDOWN,
    K.Key_D: Key.DIFF,
}


def _words(text: str) -> int:
    return len(text.split())


def word_diff_html(left: str, right: str) -> tuple[str, str]:
    """Both texts as HTML with the words that differ between them highlighted (whitespace kept)."""
    a, b = re.split(r"(\s+)", left), re.split(r"(\s+)", right)
    out_a, out_b = [], []

    def mark(tokens: list[str], color: str) -> str:
        text = html.escape("".join(tokens))
        return f'<span style="background-color:{color}">{text}</span>' if text.strip() else text

    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            out_a.append(html.escape("".join(a[i1:i2])))
            out_b.append(html.escape("".join(b[j1:j2])))
        else:
            out_a.append(mark(a[i1:i2], "#f4c7c3"))
            out_b.append(mark(b[j1:j2], "#c8e6c9"))
    wrap = '<div style="white-space: pre-wrap">{}</div>'
    return wrap.format("".join(out_a)), wrap.format("".join(out_b))


def key_of(event) -> Key | None:
    """The labelling key a key press means (None: not one)."""
    k, mods = event.key(), event.modifiers()
    if k == K.Key_Z and mods & Qt.KeyboardModifier.ControlModifier:
        return Key.UNDO
    if mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):
        return None
    if k == K.Key_E and mods & Qt.KeyboardModifier.ShiftModifier:
        return Key.EDIT_RIGHT
    return KEYS.get(k)


def _is_save(event) -> bool:
    return event.key() in (K.Key_Return, K.Key_Enter) and bool(event.modifiers() & Qt.KeyboardModifier.ControlModifier)


class EditBox(QPlainTextEdit):
    """The edit / ranking box: Ctrl+Return saves, Esc cancels. Both keys are the box's own while it has focus: it
    claims them before any window-wide shortcut (Start training is Ctrl+Return on Set up) can take them."""

    saved = Signal(str)
    cancelled = Signal()

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ShortcutOverride and (_is_save(event) or event.key() == K.Key_Escape):
            event.accept()
            return True
        return super().event(event)

    def keyPressEvent(self, event) -> None:
        if _is_save(event):
            self.saved.emit(self.toPlainText())
        elif event.key() == K.Key_Escape:
            self.cancelled.emit()
        else:
            super().keyPressEvent(event)


class LabelView(QWidget):
    """Two answers side by side; takes the keys and shows that it does."""

    key = Signal(object)  # a Key

    def __init__(self, state: AnnotateState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setObjectName("labelView")
        self.position = QLabel(self)
        self.position.setObjectName("labelPosition")
        self.focus_hint = QLabel(UNFOCUSED, self)
        self.focus_hint.setObjectName("labelFocusHint")
        self.prompt = QLabel(self)
        self.prompt.setWordWrap(True)
        self.prompt.setObjectName("labelPrompt")
        self.prompt.setTextFormat(Qt.TextFormat.PlainText)
        self.heads = [QLabel(self), QLabel(self)]
        self.answers = [QTextEdit(self), QTextEdit(self)]
        for head in self.heads:
            head.setWordWrap(True)
        for view in self.answers:
            view.setReadOnly(True)
            view.setAcceptRichText(False)
            view.setFocusPolicy(Qt.FocusPolicy.ClickFocus)
            view.setFocusProxy(self)  # a click on an answer gives the view the keys
        self.answers[0].setObjectName("leftAnswer")
        self.answers[1].setObjectName("rightAnswer")
        self.mode = "plain"  # "plain" | "markdown" | "diff"
        self._texts = ("", "")
        left_bar, right_bar = (v.verticalScrollBar() for v in self.answers)
        left_bar.valueChanged.connect(right_bar.setValue)  # synchronised scrolling
        right_bar.valueChanged.connect(left_bar.setValue)
        self.decision = QLabel(self)
        self.decision.setObjectName("labelDecision")
        self.decision.setWordWrap(True)
        self.edit_panel = QWidget(self)
        self.edit_box = EditBox(self.edit_panel)
        self.edit_box.setObjectName("editBox")
        self.edit_hint = QLabel(self.edit_panel)
        self.edit_hint.setWordWrap(True)
        self.save_button = QPushButton("Save (Ctrl+Return)", self.edit_panel)
        self.save_button.setObjectName("editSave")
        self.save_button.clicked.connect(lambda: self.edit_box.saved.emit(self.edit_box.toPlainText()))
        self.cancel_button = QPushButton("Cancel (Esc)", self.edit_panel)
        self.cancel_button.setObjectName("editCancel")
        self.cancel_button.clicked.connect(self.edit_box.cancelled.emit)
        edit_row = QHBoxLayout()
        edit_row.addWidget(self.edit_hint, 1)
        edit_row.addWidget(self.save_button)
        edit_row.addWidget(self.cancel_button)
        edit_col = QVBoxLayout(self.edit_panel)
        edit_col.setContentsMargins(0, 0, 0, 0)
        edit_col.addWidget(self.edit_box)
        edit_col.addLayout(edit_row)
        self.edit_panel.hide()
        self.keys = QLabel(KEYS_TEXT, self)
        self.keys.setWordWrap(True)
        self.keys.setObjectName("labelKeys")
        grid = QGridLayout()
        for col in (0, 1):
            grid.addWidget(self.heads[col], 0, col)
            grid.addWidget(self.answers[col], 1, col)
        top = QHBoxLayout()
        top.addWidget(self.position, 1)
        top.addWidget(self.focus_hint)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.prompt)
        layout.addLayout(grid, 1)
        layout.addWidget(self.edit_panel)
        layout.addWidget(self.decision)
        layout.addWidget(self.keys)
        self.edit_box.saved.connect(self._save)
        self.edit_box.cancelled.connect(self._cancel)
        state.subscribe(self._on_state)
        self.refresh()

    # --- showing --------------------------------------------------------------------
    def _on_state(self, topic: str) -> None:
        if topic in ("item", "strength", "session", "queue"):
            self.refresh()
        elif topic == "editing":
            self._show_editing()

    def refresh(self) -> None:
        st, item = self.state, self.state.item
        if item is None or st.prefs is None:
            self.prompt.setText("")
            self.position.setText("No pairs yet: set up a session and press Generate.")
            for head in self.heads:
                head.setText("")
            self.show_texts("", "")
            self.decision.setText("")
            return
        prefs = st.prefs
        prompt = json.loads(
            prefs.conn.execute("SELECT messages FROM prompts WHERE id = ?", (item.prompt_id,)).fetchone()[0]
        )
        self.prompt.setText(prompt[-1]["content"] if prompt else "")
        where = f"Pair {st.position + 1} of {len(st.items)}"  # its place in the queue
        if st.all_labelled:
            where += f" · all {an.plural(len(st.items), 'pair')} labelled"
        self.position.setText(where)
        texts = []
        for col, (key, cid) in enumerate((("A", item.left), ("B", item.right))):
            cand = prefs.candidate(cid)
            tokens = cand["token_count"]
            self.heads[col].setText(
                f"<b>{key}</b> ({'left' if col == 0 else 'right'}): {an.plural(len(cand['text']), 'character')}, "
                f"{an.plural(_words(cand['text']), 'word')}"
                + (f", {an.plural(tokens, 'token')}" if tokens is not None else "")
            )
            texts.append(cand["text"])
        self.show_texts(*texts)
        state = st.item_state()
        said = SAID.get(state.decision, "Not decided yet")
        if state.strength is not None:
            said += f", strength {round(state.strength * 3)}"
        pending = f" · next strength {st.strength}" if st.strength else ""
        revealed = st.revealed_prediction()  # '' until this pair is decided: no anchoring
        self.decision.setText(f"Decision: {said}{pending}" + (f" · {revealed}" if revealed else ""))

    def show_texts(self, left: str, right: str) -> None:
        self._texts = (left, right)
        if self.mode == "diff":
            for view, text in zip(self.answers, word_diff_html(left, right), strict=True):
                view.setHtml(text)
            return
        for view, text in zip(self.answers, self._texts, strict=True):
            view.setMarkdown(text) if self.mode == "markdown" else view.setPlainText(text)

    def toggle(self, mode: str) -> None:
        self.mode = "plain" if self.mode == mode else mode
        self.show_texts(*self._texts)

    def _show_editing(self) -> None:
        st, box = self.state, self.edit_box
        if not st.editing:
            self.edit_panel.hide()
            self.setFocus()
            self.refresh()
            return
        if st.editing == "rank":
            n = len(st.rank_candidates())
            box.setPlainText(st.rank_text())
            box.moveCursor(box.textCursor().MoveOperation.End)
            self.edit_hint.setText(
                f"Ranking {n} answers: type their numbers, best first (e.g. 2 1 3); saving writes "
                f"{an.plural(n * (n - 1) // 2, 'comparison')}."
            )
        else:
            item = st.item
            assert item is not None and st.prefs is not None
            box.setPlainText(st.prefs.candidate(item.left if st.editing == "left" else item.right)["text"])
            self.edit_hint.setText(f"Editing the {st.editing} answer: the edit becomes chosen, the original rejected.")
        self.edit_panel.show()
        box.setFocus()

    def _save(self, text: str) -> None:
        self.state.save(text)

    def _cancel(self) -> None:
        self.state.cancel()

    # --- keys and focus -------------------------------------------------------------
    def keyPressEvent(self, event) -> None:
        key = key_of(event)
        if key is None:
            super().keyPressEvent(event)
            return
        if key in (Key.MARKDOWN, Key.DIFF):
            self.toggle("markdown" if key is Key.MARKDOWN else "diff")
            return
        self.key.emit(key)

    def focusInEvent(self, event) -> None:
        self.focus_hint.setText(FOCUSED)
        self.update()
        super().focusInEvent(event)

    def focusOutEvent(self, event) -> None:
        self.focus_hint.setText(UNFOCUSED)
        self.update()
        super().focusOutEvent(event)

    def mousePressEvent(self, event) -> None:
        self.setFocus(Qt.FocusReason.MouseFocusReason)
        super().mousePressEvent(event)

    def paintEvent(self, event) -> None:
        super().paintEvent(event)
        if self.hasFocus():  # the keys go here: a frame in the highlight colour says so
            painter = QPainter(self)
            color = QColor(self.palette().color(QPalette.ColorRole.Highlight))
            painter.setPen(QPen(color, 2))
            painter.drawRoundedRect(self.rect().adjusted(1, 1, -1, -1), 4, 4)
