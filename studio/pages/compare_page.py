"""Compare: one prompt, two sides (the base with adapters off, a run's adapter, a checkpoint), the same seed,
answers streaming side by side; "Left is better" / "Right is better" / "Tie" records a comparison in the store.

Both sides run in the one generation worker: the base side sends ``adapter: ""``, which switches every adapter off
for that request, so the two answers differ exactly by the adapter.
"""

from __future__ import annotations

import dataclasses
from typing import cast

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.preferences import Decision, PreferenceError
from finetune_studio.core.protocol import generation as gp
from finetune_studio.core.run_status import is_exportable
from finetune_studio.studio.pages.annotate.page import SideBox
from finetune_studio.studio.services.generation_worker import AdapterSpec, GenerationWorker
from finetune_studio.studio.state.run_labels import run_labels, run_tooltip
from finetune_studio.studio.widgets.flow_layout import FlowLayout
from finetune_studio.studio.widgets.wheel_guard import guard_wheel

SOURCE = "compare"
NAMES = ("compare-left", "compare-right")


class ComparePage(QWidget):
    message = Signal(str)

    def __init__(self, store_getter, worker: GenerationWorker, model_getter=lambda: "default", parent=None):
        super().__init__(parent)
        self._store, self._model, self.worker = store_getter, model_getter, worker
        self.model = QLineEdit(self)
        self.model.setObjectName("compareModel")
        self.model.setPlaceholderText("default")
        self.sides = (SideBox("Left", 0, self), SideBox("Right", 0, self))
        for box, side in zip(self.sides, ("Left", "Right"), strict=True):
            box.adapter.setObjectName(f"compare{side}Adapter")
            box.seed.hide()
            cast(QFormLayout, box.layout()).labelForField(box.seed).hide()
        self.seed = QSpinBox(self)
        self.seed.setObjectName("compareSeed")
        self.seed.setRange(0, 2**31 - 1)
        self.temperature = QDoubleSpinBox(self)
        self.temperature.setRange(0, 2)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.7)
        self.max_new_tokens = QSpinBox(self)
        self.max_new_tokens.setObjectName("compareMaxTokens")
        self.max_new_tokens.setRange(1, 4096)
        self.max_new_tokens.setValue(128)
        self.prompt = QPlainTextEdit(self)
        self.prompt.setObjectName("comparePrompt")
        self.prompt.setPlaceholderText("A prompt for both sides")
        self.prompt.setMaximumHeight(100)
        self.send_button = QPushButton("Send to both", self)
        self.send_button.setObjectName("compareSend")
        self.send_button.clicked.connect(self.send)
        self.heads = [QLabel(self), QLabel(self)]
        self.answers = [QPlainTextEdit(self), QPlainTextEdit(self)]
        for view, side in zip(self.answers, ("Left", "Right"), strict=True):
            view.setObjectName(f"compare{side}Answer")
            view.setReadOnly(True)
        self.left_button = QPushButton("Left is better", self)
        self.right_button = QPushButton("Right is better", self)
        self.tie_button = QPushButton("Tie", self)
        self.left_button.setObjectName("compareLeftBetter")
        self.right_button.setObjectName("compareRightBetter")
        self.tie_button.setObjectName("compareTie")
        self.left_button.clicked.connect(lambda: self.record(Decision.A))
        self.right_button.clicked.connect(lambda: self.record(Decision.B))
        self.tie_button.clicked.connect(lambda: self.record(Decision.TIE))
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setObjectName("compareStatus")

        settings = QWidget(self)
        form = QFormLayout(settings)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Model", self.model)
        form.addRow("Seed (both sides)", self.seed)
        form.addRow("Temperature", self.temperature)
        form.addRow("Max new tokens", self.max_new_tokens)
        top_row = QWidget(self)
        top = FlowLayout(top_row)  # the two sides wrap under the settings in a narrow window
        top.addWidget(settings)
        for box in self.sides:
            box.setSizePolicy(QSizePolicy.Policy.Expanding, box.sizePolicy().verticalPolicy())
            top.addWidget(box)
        grid = QGridLayout()
        for col in (0, 1):
            grid.addWidget(self.heads[col], 0, col)
            grid.addWidget(self.answers[col], 1, col)
        buttons = QHBoxLayout()
        for b in (self.left_button, self.tie_button, self.right_button):
            buttons.addWidget(b)
        send = QHBoxLayout()
        send.addWidget(self.prompt, 1)
        send.addWidget(self.send_button)
        layout = QVBoxLayout(self)
        layout.addWidget(top_row)
        layout.addLayout(send)
        layout.addLayout(grid, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.status)

        self._requests: dict[str, int] = {}  # request id -> column
        self._prepare: set[str] = set()
        self._texts = ["", ""]
        self._done: list[gp.Done | None] = [None, None]
        self._used: list[tuple[str, AdapterSpec | None]] = []
        self.candidates: tuple[str, str] | None = None
        self.run_names: dict[str, str] = {}
        self.recorded = False
        worker.reply.connect(self._on_reply)
        worker.died.connect(self._on_died)
        self._set_choice_enabled(False)
        guard_wheel(self)

    @property
    def store(self):
        return self._store()

    @property
    def busy(self) -> bool:
        return bool(self._requests or self._prepare)

    def refresh(self) -> None:
        everyone = self.store.list_runs()
        runs = [r for r in everyone if is_exportable(r.status)]
        self.run_names = run_labels(runs, everyone)  # run id -> its name ("dpo-1 from sft-demo")
        tips = {r.id: run_tooltip(r) for r in runs}
        for box in self.sides:
            try:
                chosen = self._side(box, "").adapter  # a run's id, a folder, or '' for the base
            except ValueError:  # a checkpoint that is no step number: the run choice is still kept by name
                chosen = ""
            box.set_runs([r.id for r in runs])
            for i in range(box.adapter.count()):  # shown by name; the id stays the item's data
                rid = box.adapter.itemData(i)
                if rid in self.run_names:
                    box.adapter.setItemText(i, self.run_names[rid])
                    box.adapter.setItemData(i, tips[rid], Qt.ItemDataRole.ToolTipRole)
            if chosen in self.run_names:  # the run chosen before the refresh, by its name again
                box.adapter.setCurrentIndex(box.adapter.findData(chosen))
        if not self.model.text():
            self.model.setText(self._model() or "default")

    def _side(self, box, model: str):
        """The side a box describes, its adapter the run's id when a run is chosen by its name."""
        side = box.side(model)
        index = box.adapter.currentIndex()
        rid = box.adapter.itemData(index) if index >= 0 else None
        if rid and box.adapter.itemText(index) == box.adapter.currentText():
            side = dataclasses.replace(side, adapter=rid)
        return side

    def heading(self, side) -> str:
        """What answers on one side, by name: "Base model", "dpo-1 from sft-demo", "sft-demo, step 40"."""
        if not side.adapter:
            return "Base model (adapters off)"
        who = self.run_names.get(side.adapter, side.adapter)
        return who + (f", step {side.checkpoint}" if side.checkpoint is not None else "")

    def _say(self, text: str) -> None:
        self.status.setText(text)
        if text:
            self.message.emit(text.splitlines()[0])

    def _set_choice_enabled(self, on: bool) -> None:
        for b in (self.left_button, self.right_button, self.tie_button):
            b.setEnabled(on)

    def send(self) -> None:
        prompt = self.prompt.toPlainText().strip()
        if self.busy:
            return
        if not prompt:
            self._say("Type a prompt first.")
            return
        model = self.model.text().strip() or "default"
        try:
            sides = [self._side(box, model) for box in self.sides]
        except ValueError as exc:
            self._say(str(exc))
            return
        adapters = {
            name: AdapterSpec(s.adapter, s.checkpoint) for name, s in zip(NAMES, sides, strict=True) if s.adapter
        }
        self._prompt, self._sides = prompt, sides
        self._texts, self._done, self.candidates, self.recorded = ["", ""], [None, None], None, False
        self._set_choice_enabled(False)
        for col, side in enumerate(sides):
            self.answers[col].setPlainText("")
            self.heads[col].setText(self.heading(side))
        self._prepare = set(self.worker.prepare(model, adapters))
        self._requests = {}
        for col, side in enumerate(sides):
            request = gp.Generate(
                id=self.worker.new_id("cmp"),
                prompt=prompt,
                seed=self.seed.value(),
                temperature=self.temperature.value(),
                max_new_tokens=self.max_new_tokens.value(),
                adapter=NAMES[col] if side.adapter else gp.BASE,
            )
            self._requests[request.id] = col
            self.worker.send(request)
        self._say("Generating…")

    def _on_reply(self, reply) -> None:
        if reply.id in self._prepare:
            self._prepare.discard(reply.id)
            if isinstance(reply, gp.Error):
                self._say(reply.message)
            return
        col = self._requests.get(reply.id)
        if col is None:
            return
        if isinstance(reply, gp.Delta):
            self._texts[col] += reply.text
            self.answers[col].setPlainText(self._texts[col])
        elif isinstance(reply, gp.Done):
            self._done[col] = reply
            self.answers[col].setPlainText(reply.text)
        elif gp.is_final(reply):
            del self._requests[reply.id]
            if isinstance(reply, gp.Error):
                self._requests.clear()
                self._say(reply.message)
            elif not self._requests:
                self._both_done()

    def _both_done(self) -> None:
        if None in self._done:
            self._say("The generation was cut short; send the prompt again.")
            return
        prefs = self.store.preferences
        pid = prefs.add_prompt(self._prompt, source=SOURCE)
        ids = []
        for side, done in zip(self._sides, self._done, strict=True):
            assert done is not None
            ids.append(
                prefs.add_candidate(
                    pid,
                    done.text,
                    model=side.model,
                    adapter=side.adapter,
                    checkpoint="" if side.checkpoint is None else str(side.checkpoint),
                    seed=done.seed,
                    sampling={"temperature": self.temperature.value(), "max_new_tokens": self.max_new_tokens.value()},
                    token_count=done.tokens,
                    source=SOURCE,
                )
            )
        for col, done in enumerate(self._done):
            assert done is not None
            self.heads[col].setText(f"{self.heads[col].text()} · {len(done.text)} characters, {done.tokens} tokens")
        if ids[0] == ids[1]:
            self._say("Both sides gave the same answer: nothing to choose.")
            return
        self.candidates = (ids[0], ids[1])
        self._set_choice_enabled(True)
        self._say("Which answer is better? The choice is recorded in the preference store.")

    def record(self, decision: Decision) -> None:
        if self.candidates is None:
            return
        left, right = self.candidates
        try:
            self.store.preferences.compare(left, right, decision, shown_left=left, source=SOURCE)
        except PreferenceError as exc:
            self._say(str(exc))
            return
        self.recorded = True
        words = {Decision.A: "Left is better", Decision.B: "Right is better", Decision.TIE: "Tie"}[decision]
        self._say(f"Recorded: {words}.")

    def _on_died(self, message: str) -> None:
        if self.busy:
            self._requests.clear()
            self._prepare.clear()
            self._say(message)
