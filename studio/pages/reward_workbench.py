"""The reward workbench: before a GRPO run, see what the rewards make of the model's own answers.

Opened from the rewards editor (*Try the rewards…*). It samples a few answers per prompt for the first prompts of
the set-up's dataset, from the model the run would start from (the chosen model and starting adapter, at the run's
temperature), scores them with the set-up's rewards and shows every answer's scores and weighted total, the best
(green, "best") and worst (red, "worst") answer of each prompt, and per function its mean and spread. The work runs
in the generation worker and a background thread (:mod:`studio.services.reward_workbench`): the window never
freezes, and a reward's failure is a message here, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QCloseEvent, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.config import ConfigError
from finetune_studio.core.protocol.generation import GenerateBatch
from finetune_studio.studio.services.generation_worker import GenerationWorker
from finetune_studio.studio.services.reward_workbench import WorkbenchJob
from finetune_studio.studio.state import rewards as reward_rows
from finetune_studio.studio.state.reward_workbench import (
    PromptReadError,
    WorkbenchRequest,
    WorkbenchResult,
    WorkbenchState,
    read_prompts,
)
from finetune_studio.studio.state.setup import SetupState, from_form

BEST, WORST = QColor(47, 143, 91, 90), QColor(208, 80, 60, 90)  # translucent: readable on light and dark
ERROR_STYLE = "color: #d0503c;"
SHORT = 160  # characters of a prompt or answer shown in a cell (all of it in the tooltip)


# The form's sampling settings of each online RL objective: answers per prompt, longest answer, temperature.
SAMPLING_SETTINGS = {
    "grpo": ("grpo_group_size", "grpo_max_new_tokens", "grpo_temperature"),
    "ppo": ("ppo_samples_per_prompt", "ppo_max_new_tokens", "ppo_temperature"),
}


def _setting(state: SetupState, which: int, default: float) -> float:
    """The form's sampling setting ``which`` (0 answers per prompt, 1 longest answer, 2 temperature) of the objective
    chosen (GRPO's unless PPO is), as a number (its default when absent or unreadable)."""
    names = SAMPLING_SETTINGS.get(str(state.values.get("objective") or ""), SAMPLING_SETTINGS["grpo"])
    try:
        return float(str(state.values.get(names[which], default)).strip())
    except ValueError:
        return default


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SHORT else flat[: SHORT - 1] + "…"


class RewardWorkbench(QDialog):
    def __init__(self, setup: SetupState, worker: GenerationWorker, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("rewardWorkbench")
        self.setWindowTitle("Reward workbench")
        self.setup, self.worker = setup, worker
        self.state = WorkbenchState()
        self.job = WorkbenchJob(worker, self)
        self.job.status.connect(lambda text: self.state.set_status(text, busy=True))
        self.job.finished.connect(self.state.set_result)
        self.job.failed.connect(self.state.fail)

        self.about = QLabel(self)
        self.about.setObjectName("workbenchAbout")
        self.about.setWordWrap(True)
        self.prompts_spin = self._spin("workbenchPrompts", 1, 16, 4, "How many of the dataset's first prompts")
        group = int(_setting(setup, 0, 4))
        self.answers_spin = self._spin(
            "workbenchAnswers", 2, 16, max(2, min(group, 16)), "Answers sampled per prompt (GRPO's group size)"
        )
        tokens = int(_setting(setup, 1, 64))
        self.tokens_spin = self._spin("workbenchMaxTokens", 1, 2048, max(1, min(tokens, 2048)), "Longest answer")
        self.temperature = QDoubleSpinBox(self)
        self.temperature.setObjectName("workbenchTemperature")
        self.temperature.setRange(0.05, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(_setting(setup, 2, 1.0))
        self.temperature.setToolTip("Sampling temperature (the run's)")
        self.sample_button = QPushButton("Sample and score", self)
        self.sample_button.setObjectName("workbenchSample")
        self.sample_button.setDefault(True)
        self.sample_button.clicked.connect(self.sample)
        self.stop_button = QPushButton("Stop", self)
        self.stop_button.setObjectName("workbenchStop")
        self.stop_button.clicked.connect(self.job.cancel)
        settings = QHBoxLayout()
        for text, widget in (
            ("Prompts", self.prompts_spin),
            ("Answers per prompt", self.answers_spin),
            ("Max new tokens", self.tokens_spin),
            ("Temperature", self.temperature),
        ):
            label = QLabel(text, self)
            label.setBuddy(widget)
            settings.addWidget(label)
            settings.addWidget(widget)
        settings.addStretch(1)
        settings.addWidget(self.sample_button)
        settings.addWidget(self.stop_button)

        self.status = QLabel(self)
        self.status.setObjectName("workbenchStatus")
        self.status.setWordWrap(True)
        self.error = QLabel(self)
        self.error.setObjectName("workbenchError")
        self.error.setWordWrap(True)
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.note = QLabel(self)
        self.note.setObjectName("workbenchNote")
        self.note.setWordWrap(True)

        self.table = QTableWidget(self)
        self.table.setObjectName("workbenchTable")
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(True)
        self.table.verticalHeader().setVisible(False)
        self.stats = QTableWidget(self)
        self.stats.setObjectName("workbenchStats")
        self.stats.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.stats.verticalHeader().setVisible(False)
        split = QSplitter(Qt.Orientation.Vertical, self)
        split.addWidget(self.table)
        split.addWidget(self.stats)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 1)
        close = QPushButton("Close", self)
        close.setObjectName("workbenchClose")
        close.clicked.connect(self.close)
        bottom = QHBoxLayout()
        bottom.addStretch(1)
        bottom.addWidget(close)

        col = QVBoxLayout(self)
        col.addWidget(self.about)
        col.addLayout(settings)
        col.addWidget(self.status)
        col.addWidget(self.error)
        col.addWidget(self.note)
        col.addWidget(split, 1)
        col.addLayout(bottom)
        self.state.subscribe(self._on_state)
        self._describe()
        self._on_state("status")
        self.resize(900, 600)

    def _spin(self, name: str, low: int, high: int, value: int, tip: str) -> QSpinBox:
        spin = QSpinBox(self)
        spin.setObjectName(name)
        spin.setRange(low, high)
        spin.setValue(value)
        spin.setToolTip(tip)
        return spin

    # --- what it samples -----------------------------------------------------------------
    def _describe(self) -> None:
        values = self.setup.values
        model = str(values.get("model", "")) or "default"
        adapter = str(values.get("init_adapter", "") or "").strip()
        data = str(values.get("dataset", "") or "").strip()
        start = f"{Path(model).name or model}" + (f" with the adapter {adapter}" if adapter else "")
        self.about.setText(
            f"Answers sampled from {start} for the first prompts of {Path(data).name or 'the dataset'}, scored "
            "with the rewards of Set up. The best answer of each prompt is marked green, the worst red."
        )

    def prepare(self) -> None:
        """Opened (again): say what it will sample; an old error no longer stands."""
        self._describe()
        if not self.state.busy and self.state.error:
            self.state.set_status("", busy=False)

    def request(self) -> WorkbenchRequest:
        """The request for the current settings; PromptReadError or ConfigError (with words) when it cannot be."""
        values = self.setup.values
        rewards = reward_rows.typed_specs(values.get(reward_rows.FIELD, []))
        try:
            mapping = from_form("dataset_mapping", values.get("dataset_mapping", ""))
        except ConfigError:
            mapping = {}
        count = self.prompts_spin.value()
        answers = self.answers_spin.value()
        count = min(count, GenerateBatch.MAX_ROWS // answers)
        prompts = read_prompts(str(values.get("dataset", "")), count, mapping if isinstance(mapping, dict) else {})
        try:
            seed = int(str(values.get("seed", 0)))
        except ValueError:
            seed = 0
        return WorkbenchRequest(
            model=str(values.get("model", "default")) or "default",
            init_adapter=str(values.get("init_adapter", "") or ""),
            prompts=prompts,
            rewards=rewards,
            answers_per_prompt=answers,
            max_new_tokens=self.tokens_spin.value(),
            temperature=self.temperature.value(),
            seed=seed,
        )

    def sample(self) -> None:
        if self.job.running:
            return
        self._describe()
        try:
            request = self.request()
        except (PromptReadError, ConfigError) as exc:
            self.state.fail(reward_rows.reason(exc) if isinstance(exc, ConfigError) else str(exc))
            return
        self.state.set_status("Starting…", busy=True)
        self.job.start(request)

    # --- showing -------------------------------------------------------------------------
    def _on_state(self, topic: str) -> None:
        st = self.state
        if topic == "status":
            self.status.setText(st.status)
            self.status.setVisible(bool(st.status))
            self.sample_button.setEnabled(not st.busy)
            self.stop_button.setEnabled(st.busy)
        if topic in ("error", "status"):
            self.error.setText(st.error)
            self.error.setVisible(bool(st.error))
        if topic == "result" and st.result is not None:
            self.show_result(st.result)

    def show_result(self, result: WorkbenchResult) -> None:
        names = result.scored
        headers = ["Prompt", "Answer", *names, "Total", ""]
        table = self.table
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(result.count)
        totals = result.totals()
        marks = {}
        for best, worst in result.best_and_worst().values():
            marks[best], marks[worst] = ("best", BEST), ("worst", WORST)
        for flat, p, a in result.rows():
            prompt, answer = result.prompts[p].text, result.answers[p][a]
            cells = [_short(prompt) if a == 0 else "", _short(answer)]
            cells += [f"{result.scores[n][flat]:.3g}" for n in names]
            cells += [f"{totals[flat]:.3g}", marks.get(flat, ("", None))[0]]
            tips = [prompt, answer or "(an empty answer)"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col < 2:
                    item.setToolTip(tips[col])
                else:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                colour = marks.get(flat, ("", None))[1]
                if colour is not None:
                    item.setBackground(QBrush(colour))
                table.setItem(flat, col, item)
        header = table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        table.setColumnWidth(0, 180)
        self._show_stats(result)
        notes = [f"{name}: {why}." for name, why in result.unscored.items()]
        self.note.setText(" ".join(notes))
        self.note.setVisible(bool(notes))

    def _show_stats(self, result: WorkbenchResult) -> None:
        rows = result.stats()
        headers = ["Function", "Weight", "Mean", "Std", "Min – max", "Prompts with one score for all answers"]
        self.stats.clear()
        self.stats.setColumnCount(len(headers))
        self.stats.setHorizontalHeaderLabels(headers)
        self.stats.setRowCount(len(rows))
        for r, s in enumerate(rows):
            cells = [
                s.name,
                "" if s.name == "total" else f"{s.weight:g}",
                f"{s.mean:.3g}",
                f"{s.std:.3g}",
                f"{s.min:.3g} – {s.max:.3g}",
                f"{s.flat_prompts} of {len(result.prompts)}",
            ]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.stats.setItem(r, c, item)
        self.stats.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.stats.horizontalHeader().setStretchLastSection(True)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.job.running:
            self.job.cancel()
        super().closeEvent(event)
