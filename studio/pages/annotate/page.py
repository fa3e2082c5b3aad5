"""Annotate: set up a labelling session, generate its candidates in the worker, label pairs by keyboard, export.

Keys (on the labelling view, shown on screen): A / B the left / right answer is better, T tie, X both bad, S skip,
E edit the left answer (Shift+E the right one; Ctrl+Return saves, Esc cancels), 1-3 the strength of the next
A / B, Ctrl+Z undo, Right / Down / J next, Left / Up / K previous, M Markdown view, D word diff. Every decision is
written to the store at once.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from pathlib import Path
from typing import cast

from PySide6.QtCore import QEvent, QProcess, Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.preferences import PreferenceError
from finetune_studio.core.run_status import is_exportable
from finetune_studio.studio.services.annotation_generation import SessionGenerator
from finetune_studio.studio.services.engine_process import PROJECT_ROOT, engine_command, engine_environment
from finetune_studio.studio.services.generation_worker import GenerationWorker
from finetune_studio.studio.state import annotation as an

KEYS_TEXT = (
    "<b>A</b> left better · <b>B</b> right better · <b>T</b> tie · <b>X</b> both bad · <b>S</b> skip · "
    "<b>E</b> / <b>Shift+E</b> edit left / right · <b>1-3</b> strength · <b>Ctrl+Z</b> undo · "
    "<b>→ J</b> next · <b>← K</b> previous · <b>M</b> Markdown · <b>D</b> word diff · <b>R</b> rank all (3+ answers)"
)
BASE_LABEL = "Base model (adapters off)"
EXPORT_FORMATS = ("trl", "trl-conversational", "llama-factory")


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


def _is_save(event) -> bool:
    return event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and bool(
        event.modifiers() & Qt.KeyboardModifier.ControlModifier
    )


class EditBox(QPlainTextEdit):
    """The edit / ranking box: Ctrl+Return saves, Esc cancels. Both keys are the box's own while it has focus: it
    claims them before any window-wide shortcut (Start training is Ctrl+Return on Set up) can take them."""

    saved = Signal(str)
    cancelled = Signal()

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ShortcutOverride and (_is_save(event) or event.key() == Qt.Key.Key_Escape):
            event.accept()
            return True
        return super().event(event)

    def keyPressEvent(self, event) -> None:
        if _is_save(event):
            self.saved.emit(self.toPlainText())
        elif event.key() == Qt.Key.Key_Escape:
            self.cancelled.emit()
        else:
            super().keyPressEvent(event)


class LabelView(QWidget):
    """Two answers side by side; takes the keys."""

    key = Signal(str)  # 'left', 'right', 'tie', 'both_bad', 'skip', 'edit_left', 'edit_right', 'undo', ...

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setObjectName("labelView")
        self.prompt = QLabel(self)
        self.prompt.setWordWrap(True)
        self.prompt.setObjectName("labelPrompt")
        self.position = QLabel(self)
        self.position.setObjectName("labelPosition")
        self.heads = [QLabel(self), QLabel(self)]
        self.answers = [QTextEdit(self), QTextEdit(self)]
        for view in self.answers:
            view.setReadOnly(True)
            view.setAcceptRichText(False)
            view.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.mode = "plain"  # "plain" | "markdown" | "diff"
        self._texts = ("", "")
        left_bar, right_bar = (v.verticalScrollBar() for v in self.answers)
        left_bar.valueChanged.connect(right_bar.setValue)  # synchronised scrolling
        right_bar.valueChanged.connect(left_bar.setValue)
        self.decision = QLabel(self)
        self.decision.setObjectName("labelDecision")
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
        layout = QVBoxLayout(self)
        layout.addWidget(self.position)
        layout.addWidget(self.prompt)
        layout.addLayout(grid, 1)
        layout.addWidget(self.edit_panel)
        layout.addWidget(self.decision)
        layout.addWidget(self.keys)

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

    def keyPressEvent(self, event) -> None:
        k, mods = event.key(), event.modifiers()
        K = Qt.Key
        if k in (K.Key_M, K.Key_D) and not mods & ~Qt.KeyboardModifier.KeypadModifier:
            self.toggle("markdown" if k == K.Key_M else "diff")
            return
        if k == K.Key_Z and mods & Qt.KeyboardModifier.ControlModifier:
            self.key.emit("undo")
            return
        if mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):
            super().keyPressEvent(event)
            return
        shift = bool(mods & Qt.KeyboardModifier.ShiftModifier)
        names = {
            K.Key_A: "left",
            K.Key_B: "right",
            K.Key_T: "tie",
            K.Key_X: "both_bad",
            K.Key_S: "skip",
            K.Key_R: "rank",
            K.Key_E: "edit_right" if shift else "edit_left",
            K.Key_1: "strength_1",
            K.Key_2: "strength_2",
            K.Key_3: "strength_3",
            K.Key_J: "next",
            K.Key_Right: "next",
            K.Key_Down: "next",
            K.Key_K: "previous",
            K.Key_Left: "previous",
            K.Key_Up: "previous",
        }
        name = names.get(k)
        if name:
            self.key.emit(name)
        else:
            super().keyPressEvent(event)


class SideBox(QGroupBox):
    def __init__(self, title: str, seed: int, parent: QWidget | None = None):
        super().__init__(title, parent)
        self.adapter = QComboBox(self)
        self.adapter.setEditable(True)
        self.adapter.setToolTip("The base model, a run (its final adapter) or an adapter folder")
        self.checkpoint = QLineEdit(self)
        self.checkpoint.setPlaceholderText("final adapter")
        self.checkpoint.setToolTip("A checkpoint step of the run (empty: its final adapter)")
        self.seed = QSpinBox(self)
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(seed)
        form = QFormLayout(self)
        form.addRow("Adapter", self.adapter)
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Seed", self.seed)
        self.set_runs([])

    def set_runs(self, run_ids: list[str]) -> None:
        current = self.adapter.currentText()
        self.adapter.clear()
        self.adapter.addItem(BASE_LABEL, "")
        for rid in run_ids:
            self.adapter.addItem(rid, rid)
        if current and current != BASE_LABEL:
            self.adapter.setEditText(current)

    def side(self, model: str) -> an.Side:
        text = self.adapter.currentText().strip()
        adapter = "" if text in ("", BASE_LABEL) else text
        step = self.checkpoint.text().strip()
        if step and not step.isdigit():
            raise ValueError(f"checkpoint: a step number, not {step!r}")
        return an.Side(model=model, adapter=adapter, checkpoint=int(step) if step else None, seed=self.seed.value())

    def show_side(self, side: an.Side) -> None:
        self.adapter.setEditText(side.adapter or BASE_LABEL)
        self.checkpoint.setText("" if side.checkpoint is None else str(side.checkpoint))
        self.seed.setValue(side.seed)


class AnnotatePage(QWidget):
    train_dpo_requested = Signal(dict)  # a config fragment for Set up
    message = Signal(str)

    def __init__(
        self,
        store_getter,
        model_getter=lambda: "default",
        worker: GenerationWorker | None = None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self._store = store_getter
        self._model = model_getter
        self._own_worker = worker is None
        self.worker = worker or GenerationWorker(self, threads=1)
        self.generator = SessionGenerator(self.worker, self)
        self.spec: an.SessionSpec | None = None
        self.labeller: an.Labeller | None = None
        self.index = 0
        self.strength: int | None = None
        self.editing = ""  # 'left' / 'right' while the edit box is open
        self.last_snapshot = ""
        self._export: QProcess | None = None
        self.choose_export_dir = lambda: QFileDialog.getExistingDirectory(self, "Export the pairs to…")
        self.choose_import_file = lambda: QFileDialog.getOpenFileName(
            self, "Import preference pairs", "", "Preference data (*.jsonl *.json *.parquet *.csv)"
        )[0]
        self._build()
        self.generator.progress.connect(self._on_progress)
        self.generator.streaming.connect(self._on_stream)
        self.generator.items_added.connect(self._on_items_added)
        self.generator.finished.connect(self._on_generated)
        self.worker.died.connect(lambda msg: self._say(msg))
        self.label_view.key.connect(self.on_key)
        self.annotator.editingFinished.connect(self._annotator_changed)
        self.label_view.edit_box.saved.connect(self._save_edit)
        self.label_view.edit_box.cancelled.connect(self._close_edit)

    # --- building -------------------------------------------------------------------
    def _build(self) -> None:
        setup = QWidget(self)
        self.session_name = QLineEdit("session-1", setup)
        self.session_name.setObjectName("sessionName")
        self.sessions = QComboBox(setup)
        self.sessions.setToolTip("Reopen an earlier session: it continues where it stopped")
        self.open_button = QPushButton("Open", setup)
        self.open_button.clicked.connect(lambda: self.open_session(self.sessions.currentText()))
        self.model = QLineEdit(setup)
        self.model.setObjectName("sessionModel")
        self.model.setPlaceholderText("default")
        self.prompts = QPlainTextEdit(setup)
        self.prompts.setObjectName("sessionPrompts")
        self.prompts.setPlaceholderText("Prompts, one per line (or JSONL rows); answers are not needed")
        self.load_prompts_button = QPushButton("Prompts from a dataset…", setup)
        self.load_prompts_button.clicked.connect(self._choose_prompts_file)
        self.side_a, self.side_b = SideBox("Side A", 1, setup), SideBox("Side B", 2, setup)
        self.pairs_per_prompt = QSpinBox(setup)
        self.pairs_per_prompt.setObjectName("pairsPerPrompt")
        self.pairs_per_prompt.setRange(1, 3)
        self.pairs_per_prompt.setSuffix(" pair(s)")
        self.pairs_per_prompt.setToolTip("Pairs per prompt: 1 to 3 (2 to 6 candidates, half from each side)")
        self.temperature = QDoubleSpinBox(setup)
        self.temperature.setRange(0, 2)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.8)
        self.top_p = QDoubleSpinBox(setup)
        self.top_p.setRange(0.01, 1)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(0.95)
        self.max_new_tokens = QSpinBox(setup)
        self.max_new_tokens.setObjectName("maxNewTokens")
        self.max_new_tokens.setRange(1, 4096)
        self.max_new_tokens.setValue(128)
        self.annotator = QLineEdit(setup)
        self.annotator.setObjectName("annotatorName")
        self.annotator.setPlaceholderText("your name (optional)")
        self.generate_button = QPushButton("Generate", setup)
        self.generate_button.setObjectName("generateButton")
        self.generate_button.setToolTip("Save the session and generate the candidates it still lacks")
        self.generate_button.clicked.connect(self.generate)
        self.stop_button = QPushButton("Stop", setup)
        self.stop_button.clicked.connect(self.generator.stop)
        self.stop_button.setEnabled(False)
        self.gen_progress = QProgressBar(setup)
        self.gen_progress.setObjectName("generationProgress")
        self.stream_head = QLabel(setup)
        self.stream = QPlainTextEdit(setup)
        self.stream.setReadOnly(True)
        self.stream.setMaximumHeight(120)
        self.status = QLabel(setup)
        self.status.setObjectName("annotateStatus")
        self.status.setWordWrap(True)
        form = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.sessions, 1)
        row.addWidget(self.open_button)
        form.addRow("Reopen", row)
        form.addRow("Session", self.session_name)
        form.addRow("Model", self.model)
        form.addRow("Candidates", self.pairs_per_prompt)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Annotator", self.annotator)
        sides = QHBoxLayout()
        sides.addWidget(self.side_a)
        sides.addWidget(self.side_b)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        col = QVBoxLayout(setup)
        col.addLayout(form)
        col.addWidget(self.prompts, 1)
        col.addWidget(self.load_prompts_button)
        col.addLayout(sides)
        col.addLayout(buttons)
        col.addWidget(self.gen_progress)
        col.addWidget(self.stream_head)
        col.addWidget(self.stream)
        col.addWidget(self.status)

        right = QWidget(self)
        self.label_view = LabelView(right)
        self.progress_label = QLabel(right)
        self.progress_label.setObjectName("labelProgress")
        self.policy = QLabel(right)
        self.policy.setWordWrap(True)
        self.export_format = QComboBox(right)
        self.export_format.addItems(EXPORT_FORMATS)
        self.export_button = QPushButton("Export pairs…", right)
        self.export_button.setObjectName("exportPairsButton")
        self.export_button.clicked.connect(self.export)
        self.import_button = QPushButton("Import pairs…", right)
        self.import_button.setToolTip("Add the pairs of a preference file (TRL, HH, UltraFeedback, ...) to the store")
        self.import_button.clicked.connect(self.import_pairs)
        self.train_button = QPushButton("Train DPO on these pairs", right)
        self.train_button.setObjectName("trainDpoButton")
        self.train_button.clicked.connect(self.train_dpo)
        bottom = QHBoxLayout()
        bottom.addWidget(self.export_format)
        bottom.addWidget(self.export_button)
        bottom.addWidget(self.import_button)
        bottom.addStretch(1)
        bottom.addWidget(self.train_button)
        rcol = QVBoxLayout(right)
        rcol.addWidget(self.label_view, 1)
        rcol.addWidget(self.progress_label)
        rcol.addWidget(self.policy)
        rcol.addLayout(bottom)

        splitter = QSplitter(self)
        splitter.addWidget(setup)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 3)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self._refresh_label()

    # --- session --------------------------------------------------------------------
    @property
    def store(self):
        return self._store()

    def refresh(self) -> None:
        """Runs for the side pickers, sessions to reopen."""
        runs = [r["id"] for r in self.store.list_runs() if is_exportable(r.get("status") or "")]
        self.side_a.set_runs(runs)
        self.side_b.set_runs(runs)
        current = self.sessions.currentText()
        sessions = an.list_sessions()
        self.sessions.clear()
        self.sessions.addItems(sessions)
        if current:
            self.sessions.setCurrentText(current)
        if not self.model.text():
            self.model.setText(self._model() or "default")
        if self.spec is None and sessions and not self.generator.running:
            self.open_session(sessions[0])  # the app reopened: continue the latest session where it stopped

    def _say(self, text: str) -> None:
        self.status.setText(text)
        if text:
            self.message.emit(text.splitlines()[0])

    def spec_from_form(self) -> an.SessionSpec:
        model = self.model.text().strip() or "default"
        return an.SessionSpec(
            name=self.session_name.text(),
            prompts=an.prompts_from_text(self.prompts.toPlainText()),
            side_a=self.side_a.side(model),
            side_b=self.side_b.side(model),
            sampling=an.Sampling(
                temperature=self.temperature.value(),
                top_p=self.top_p.value(),
                max_new_tokens=self.max_new_tokens.value(),
            ),
            pairs_per_prompt=self.pairs_per_prompt.value(),
            annotator=self.annotator.text().strip(),
        )

    def load_prompts_file(self, path: str) -> None:
        try:
            prompts = an.prompts_from_file(path)
        except ValueError as exc:
            self._say(str(exc))
            return
        self.prompts.setPlainText("\n".join(p.replace("\n", " ") for p in prompts))
        self._say(f"{len(prompts)} prompts from {Path(path).name} (answers left out).")

    def _choose_prompts_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Prompts from a dataset", "", "Datasets (*.jsonl *.json)")
        if path:
            self.load_prompts_file(path)

    def generate(self) -> None:
        if self.generator.running:
            return
        try:
            spec = self.spec_from_form()
        except ValueError as exc:
            self._say(str(exc))
            return
        if self.spec is not None and self.spec.name == spec.name:
            same = (spec.prompts[: len(self.spec.prompts)], spec.side_a, spec.side_b) == (
                self.spec.prompts,
                self.spec.side_a,
                self.spec.side_b,
            )
            if not same or spec.sampling != self.spec.sampling or spec.pairs_per_prompt != self.spec.pairs_per_prompt:
                if self.spec.items:
                    self._say("This session has answers already: name a new session to change its sides or settings.")
                    return
            spec.items = self.spec.items
        elif spec.path.exists():
            self._say(f"A session named {spec.name!r} exists: open it (Reopen) or choose another name.")
            return
        spec.save()
        if self.sessions.findText(spec.name) < 0:
            self.sessions.addItem(spec.name)
        self._use(spec)
        count = self.generator.start(spec, self.store.preferences)
        if count:
            self.generate_button.setEnabled(False)
            self.stop_button.setEnabled(True)
            self._say(f"Generating answers for {count} prompts…")
        else:
            self._say("Every prompt has its answers.")

    def open_session(self, name: str) -> None:
        if not name or self.generator.running:
            return
        try:
            spec = an.SessionSpec.load(name)
        except ValueError as exc:
            self._say(str(exc))
            return
        self.session_name.setText(spec.name)
        self.prompts.setPlainText("\n".join(spec.prompts))
        self.model.setText(spec.side_a.model)
        self.side_a.show_side(spec.side_a)
        self.side_b.show_side(spec.side_b)
        self.pairs_per_prompt.setValue(spec.pairs_per_prompt)
        self.temperature.setValue(spec.sampling.temperature)
        self.top_p.setValue(spec.sampling.top_p)
        self.max_new_tokens.setValue(spec.sampling.max_new_tokens)
        self.annotator.setText(spec.annotator)
        self._use(spec)
        missing = len(self.generator.missing_prompts(spec, self.store.preferences))
        self._say(f"Session {spec.name!r} reopened" + (f"; {missing} prompts still need answers." if missing else "."))

    def _use(self, spec: an.SessionSpec) -> None:
        self.spec = spec
        self.labeller = an.Labeller(self.store.preferences, spec)
        self.index = self._first_open()
        self._refresh_label()

    def _annotator_changed(self) -> None:
        """Another person labels the same session under their own name (their decisions are theirs)."""
        name = self.annotator.text().strip()
        if self.spec is not None and name != self.spec.annotator:
            self.spec.annotator = name  # the session reopens under the name typed last, whenever it was typed
            self.spec.save()
        if self.labeller is not None and name != self.labeller.annotator:
            assert self.spec is not None
            self.labeller = an.Labeller(self.store.preferences, self.spec, annotator=name)
            self.index = self._first_open()
            self._refresh_label()
            self._say(f"Labelling as {name or 'no name'}.")

    def _first_open(self) -> int:
        assert self.spec is not None
        for i, item in enumerate(self.spec.items):
            assert self.labeller is not None
            if not self.labeller.state(item).decision:
                return i
        return max(0, len(self.spec.items) - 1)

    # --- generation -----------------------------------------------------------------
    def _on_progress(self, done: int, total: int) -> None:
        self.gen_progress.setRange(0, max(1, total))
        self.gen_progress.setValue(done)

    def _on_stream(self, head: str, text: str) -> None:
        self.stream_head.setText(head)
        self.stream.setPlainText(text)

    def _on_items_added(self) -> None:
        was_empty = self.label_view.prompt.text() == ""
        if was_empty:
            self.index = self._first_open()
        self._refresh_label()

    def _on_generated(self, problem: str) -> None:
        self.generate_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        if not problem:
            assert self.spec is not None
            problem = f"All answers generated: {len(self.spec.items)} pairs to label."
        self._say(problem)
        self._refresh_label()

    # --- labelling ------------------------------------------------------------------
    @property
    def item(self) -> an.Item | None:
        if self.spec is None or not self.spec.items:
            return None
        return self.spec.items[min(self.index, len(self.spec.items) - 1)]

    def on_key(self, name: str) -> None:
        if self.editing:
            return
        item = self.item
        if name == "undo":
            self.undo()
        elif name == "next":
            self.go(self.index + 1)
        elif name == "previous":
            self.go(self.index - 1)
        elif name.startswith("strength_"):
            self.strength = int(name[-1])
            self._refresh_label()
        elif item is None:
            return
        elif name in ("edit_left", "edit_right"):
            self._open_edit(name[5:])
        elif name == "rank":
            self._open_rank()
        else:
            strength = (
                an.STRENGTHS.get(self.strength) if name in ("left", "right") and self.strength is not None else None
            )
            assert self.labeller is not None
            try:
                self.labeller.decide(item, name, strength)
            except PreferenceError as exc:
                self._say(str(exc))
                return
            self.strength = None
            self._advance()

    def go(self, index: int) -> None:
        if self.spec and self.spec.items:
            self.index = max(0, min(index, len(self.spec.items) - 1))
            self._refresh_label()

    def _advance(self) -> None:
        assert self.spec is not None and self.labeller is not None
        items = self.spec.items
        for i in list(range(self.index + 1, len(items))) + list(range(0, self.index + 1)):
            if not self.labeller.state(items[i]).decision:
                self.index = i
                break
        self._refresh_label()

    def undo(self) -> None:
        if self.labeller is None or not self.labeller.can_undo:
            self._say("Nothing to undo.")
            return
        item = self.labeller.undo()
        assert self.spec is not None
        if item in self.spec.items:
            self.index = self.spec.items.index(item)
        self._say("Undone.")
        self._refresh_label()

    def _open_edit(self, side: str) -> None:
        item = self.item
        assert item is not None
        self.editing = side
        box = self.label_view.edit_box
        box.setPlainText(self.store.preferences.candidate(item.left if side == "left" else item.right)["text"])
        self.label_view.edit_panel.show()
        box.setFocus()
        self.label_view.edit_hint.setText(f"Editing the {side} answer: the edit becomes chosen, the original rejected.")
        self.label_view.decision.setText(
            f"Editing the {side} answer: Ctrl+Return saves (it becomes chosen), Esc cancels"
        )

    def _open_rank(self) -> None:
        assert self.labeller is not None and self.item is not None
        ids = self.labeller.candidates_of(self.item)
        if len(ids) < 3:
            self._say("Ranking needs 3 or more answers to a prompt: set Candidates to 2 or 3 pairs.")
            return
        self.editing = "rank"
        prefs = self.store.preferences
        lines = [f"{i + 1}: {prefs.candidate(c)['text'][:100]!r}" for i, c in enumerate(ids)]
        box = self.label_view.edit_box
        box.setPlainText("\n".join(lines) + "\n\norder, best first: ")
        box.moveCursor(box.textCursor().MoveOperation.End)
        self.label_view.edit_panel.show()
        box.setFocus()
        self.label_view.edit_hint.setText(f"Ranking {len(ids)} answers: their numbers, best first.")
        self.label_view.decision.setText(
            f"Ranking {len(ids)} answers: type their numbers best first after 'order' (e.g. 2 1 3), Ctrl+Return saves "
            f"({len(ids) * (len(ids) - 1) // 2} comparisons), Esc cancels"
        )

    def _save_rank(self, text: str) -> None:
        assert self.labeller is not None and self.item is not None
        ids = self.labeller.candidates_of(self.item)
        tail = text.rsplit("order, best first:", 1)[-1]
        order = [int(d) - 1 for d in re.findall(r"\d+", tail)]
        if sorted(order) != list(range(len(ids))):
            self._say(f"Give each number from 1 to {len(ids)} once, best first.")
            return
        try:
            self.labeller.rank(self.item, [ids[i] for i in order])
        except PreferenceError as exc:
            self._say(str(exc))
            return
        self._close_edit()
        self._advance()

    def _save_edit(self, text: str) -> None:
        if self.editing == "rank":
            self._save_rank(text)
            return
        assert self.labeller is not None and self.item is not None
        try:
            self.labeller.edit(self.item, self.editing, text)
        except PreferenceError as exc:
            self._say(str(exc))
            return
        self._close_edit()
        self._advance()

    def _close_edit(self) -> None:
        self.editing = ""
        self.label_view.edit_panel.hide()
        self.label_view.setFocus()
        self._refresh_label()

    def _refresh_label(self) -> None:
        view, item = self.label_view, self.item
        if item is None:
            view.prompt.setText("")
            view.position.setText("No pairs yet: set up a session and press Generate.")
            for head in view.heads:
                head.setText("")
            view.show_texts("", "")
            view.decision.setText("")
            self.progress_label.setText("")
            self._refresh_policy()
            return
        assert self.spec is not None and self.labeller is not None
        prefs = self.store.preferences
        prompt = json.loads(
            prefs.conn.execute("SELECT messages FROM prompts WHERE id = ?", (item.prompt_id,)).fetchone()[0]
        )
        view.prompt.setText(prompt[-1]["content"] if prompt else "")
        view.position.setText(f"Pair {self.index + 1} of {len(self.spec.items)}")
        texts = []
        for col, (key, cid) in enumerate((("A", item.left), ("B", item.right))):
            cand = prefs.candidate(cid)
            tokens = cand["token_count"]
            view.heads[col].setText(
                f"<b>{key}</b> ({'left' if col == 0 else 'right'}): {len(cand['text'])} characters, "
                f"{_words(cand['text'])} words" + (f", {tokens} tokens" if tokens is not None else "")
            )
            texts.append(cand["text"])
        view.show_texts(*texts)
        state = self.labeller.state(item)
        said = {
            "left": "A (left) is better",
            "right": "B (right) is better",
            "tie": "Tie",
            "both_bad": "Both bad",
            "skip": "Skipped",
            "edit": "Edited (the edit is chosen)",
        }.get(state.decision, "Not decided yet")
        if state.strength is not None:
            said += f", strength {round(state.strength * 3)}"
        pending = f" · next strength {self.strength}" if self.strength else ""
        view.decision.setText(f"Decision: {said}{pending}")
        p = an.progress(self.labeller, self.spec.items)
        rate = f"{p.left_rate:.0%}" if p.left_rate is not None else "–"
        self.progress_label.setText(
            f"{p.done} done, {p.remaining} remaining · ties {p.ties} · both bad {p.both_bad} · skips {p.skips} · "
            f"edits {p.edits} · left picks {rate}"
            + (f" · {p.per_hour:.0f} per hour" if p.per_hour else "")
            + "".join(
                f" · κ {k:.2f} with {other or 'no name'} ({n} items)"
                for other, (k, n) in an.agreement(self.labeller, self.spec.items).items()
            )
        )
        self._refresh_policy()

    def _refresh_policy(self) -> None:
        prefs = self.store.preferences
        self.policy.setText(f"{len(prefs.pairs())} DPO pairs in the store. " + an.policy_text(prefs.left_out()))

    # --- export and training --------------------------------------------------------
    def _pairs_cli(self, what: str, args: list[str], done) -> None:
        """``engine pairs EXPORT|IMPORT ... --json`` in the background; ``done(summary)`` with its JSON answer."""
        if self._export is not None:
            return
        argv = engine_command("pairs", *args, "--json")
        proc = QProcess(self)
        proc.setProcessEnvironment(engine_environment())
        proc.setWorkingDirectory(str(PROJECT_ROOT))
        proc.finished.connect(lambda code, _status: self._pairs_done(proc, code, what, done))
        self._export = proc
        self.export_button.setEnabled(False)
        self.import_button.setEnabled(False)
        self._say(f"{what.capitalize()} of the pairs…")
        proc.start(argv[0], argv[1:])

    def _pairs_done(self, proc: QProcess, code: int, what: str, done) -> None:
        out = cast(bytes, proc.readAllStandardOutput().data()).decode("utf-8", errors="replace").strip()
        err = cast(bytes, proc.readAllStandardError().data()).decode("utf-8", errors="replace").strip()
        proc.deleteLater()
        self._export = None
        self.export_button.setEnabled(True)
        self.import_button.setEnabled(True)
        summary = None
        if code == 0 and out:
            try:
                summary = json.loads(out.splitlines()[-1])
            except json.JSONDecodeError:
                summary = None
        if not isinstance(summary, dict):
            last = [line for line in err.splitlines() if line.strip()]
            self._say(
                f"{what.capitalize()} failed: " + (last[-1].removeprefix("error: ") if last else f"exit code {code}")
            )
            return
        done(summary)
        self._refresh_policy()

    def export(self) -> None:
        out = self.choose_export_dir()
        if out:
            self._pairs_cli("export", ["export", out, "--format", self.export_format.currentText()], self._exported)

    def import_pairs(self) -> None:
        path = self.choose_import_file()
        if path:
            self._pairs_cli("import", ["import", path], self._imported)

    def _imported(self, s: dict) -> None:
        self._say(
            f"Imported {s['pairs']} pairs from {Path(s['file']).name} ({s['format']}): {s['added']} new, "
            f"{s['unchanged']} already in the store, {s['changed']} with a changed decision."
        )

    def _exported(self, manifest: dict) -> None:
        self.last_snapshot = manifest["snapshot"]
        self.last_export = manifest
        self._say(
            f"Exported {manifest['pairs']} pairs ({manifest['format']}) as snapshot {manifest['snapshot']}. "
            + an.policy_text(manifest.get("left_out") or {})
        )

    def train_dpo(self) -> None:
        """Set up for DPO on the store's pairs (the last export's snapshot, else the pairs as they are now), from the
        adapter that answered, at DPO's learning rate, under a run name of its own."""
        spec = self.spec
        config: dict = {
            "objective": "dpo",
            "dataset": f"pairs:{self.last_snapshot}" if self.last_snapshot else "pairs:latest",
            "learning_rate": an.DPO_LEARNING_RATE,
            "run_name": "dpo" + (f"-{spec.name}" if spec is not None else ""),
        }
        if spec is not None:
            side = spec.side_a if spec.side_a.adapter else spec.side_b
            config["model"] = spec.side_a.model
            config["init_adapter"] = side.init_adapter
            if side.adapter:
                run = self.store.get_run(side.adapter) if "/" not in side.adapter else None
                config["run_name"] = f"dpo-from-{(run or {}).get('name') or Path(side.adapter).name}"
        self.train_dpo_requested.emit(config)

    def shutdown(self) -> None:
        self.generator.stop()
        if self._own_worker:
            self.worker.shutdown()
        if self._export is not None:
            self._export.kill()
