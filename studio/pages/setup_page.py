"""Set up a run: model, dataset, method × objective, hyper-parameters (basic and advanced), presets, memory; for GRPO
its rewards (``widgets.rewards_editor``) and the reward workbench (``pages.reward_workbench``); for a distillation its
student (``widgets.student_choice``: the model as it is, or with fewer layers)."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QApplication,
    QButtonGroup,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core import methods as method_table
from finetune_studio.core.config import OBJECTIVE_LABELS, OBJECTIVES, PARALLELISMS, TrainConfig
from finetune_studio.core.protocol.device_report import DeviceReport
from finetune_studio.studio.pages.reward_workbench import RewardWorkbench
from finetune_studio.studio.services import estimate
from finetune_studio.studio.services.generation_worker import GenerationWorker
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.state.presets import Preset, load_presets
from finetune_studio.studio.state.run import MemoryState
from finetune_studio.studio.state.setup import FIELDS, HELP, OBJECTIVE_SENTENCES, OWN_WIDGETS, SetupState
from finetune_studio.studio.widgets.config_form import ConfigForm, ErrorLabel, label_for
from finetune_studio.studio.widgets.dataset_panel import DatasetPanel
from finetune_studio.studio.widgets.flow_layout import FlowLayout
from finetune_studio.studio.widgets.memory_panel import MemoryPanel
from finetune_studio.studio.widgets.model_panel import ModelPanel
from finetune_studio.studio.widgets.rewards_editor import RewardsEditor
from finetune_studio.studio.widgets.student_choice import StudentChoice
from finetune_studio.studio.widgets.wheel_guard import guard_wheel

# Settings that only one objective reads, by their prefix: shown only while that objective is chosen.
OBJECTIVE_PREFIXES = {"grpo_": "grpo", "ppo_": "ppo", "distill_": "distill"}
PARALLELISM_LABELS = {"ddp": "DDP", "fsdp": "FSDP"}
PROCESSES_HELP = (
    "Train on several GPUs of this machine: one process per GPU (train --nproc N). Each process trains its "
    "share of every global batch (batch_size x gradient_accumulation_steps, which must split evenly); the memory "
    "budget is then one GPU's."
)
BASIC = [n for n in FIELDS if n not in OWN_WIDGETS and not HELP[n]["advanced"]]
ADVANCED = [n for n in FIELDS if n not in OWN_WIDGETS and HELP[n]["advanced"]]


class Segmented(QWidget):
    """A row of checkable buttons bound to one choice field of the state."""

    def __init__(self, state: SetupState, name: str, labels: dict[str, str], parent: QWidget | None = None):
        super().__init__(parent)
        self.state, self.name = state, name
        self.group = QButtonGroup(self)
        self.buttons: dict[str, QPushButton] = {}
        row = FlowLayout(self, spacing=0)  # many choices wrap onto a second row instead of widening the page
        for value, text in labels.items():
            btn = QPushButton(text, self)
            btn.setObjectName(f"{name}_{value}")
            btn.setCheckable(True)
            btn.setProperty("segment", True)
            btn.setToolTip(HELP[name]["help"])
            self.group.addButton(btn)
            self.buttons[value] = btn
            row.addWidget(btn)
            btn.clicked.connect(lambda _=False, v=value: state.set(name, v))
        state.subscribe(lambda topic: self.sync() if topic in (f"values:{name}", "values:*") else None)
        self.sync()

    def sync(self) -> None:
        btn = self.buttons.get(str(self.state.values[self.name]))
        if btn is not None and not btn.isChecked():
            btn.setChecked(True)


class SetupPage(QWidget):
    start_requested = Signal(object)  # TrainConfig

    def __init__(
        self,
        state: SetupState,
        memory: MemoryState,
        recent_models: list[str] | None = None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.state, self.memory = state, memory
        self.model_panel = ModelPanel(state, recent_models, self)
        self.dataset_panel = DatasetPanel(state, self)
        choices = QWidget(self)
        lcol = QVBoxLayout(choices)
        lcol.addWidget(self.model_panel)
        lcol.addWidget(self.dataset_panel, 1)
        left = QScrollArea(self)  # on a short screen the model and dataset panels scroll, the window stays small
        left.setObjectName("choicesScroll")
        left.setWidgetResizable(True)
        left.setFrameShape(QScrollArea.Shape.NoFrame)
        left.setWidget(choices)

        # every method of core.methods, its one sentence (what it trains, what it costs) as its tooltip and below
        self.method = Segmented(state, "method", {m.name: m.label for m in method_table.TABLE}, self)
        for value, button in self.method.buttons.items():
            button.setToolTip(method_table.method(value).summary)
        self.method_about = QLabel(self)
        self.method_about.setObjectName("methodAbout")
        self.method_about.setWordWrap(True)
        labels = {o: OBJECTIVE_LABELS.get(o, o.upper()) for o in OBJECTIVES}  # a new objective shows its name
        self.objective = Segmented(state, "objective", labels, self)
        for value, button in self.objective.buttons.items():
            button.setToolTip(OBJECTIVE_SENTENCES.get(value, HELP["objective"]["help"]))
        self.objective_about = QLabel(self)  # what the chosen objective trains, in one sentence
        self.objective_about.setObjectName("objectiveAbout")
        self.objective_about.setWordWrap(True)
        self.method_error, self.objective_error = ErrorLabel(self), ErrorLabel(self)
        self.student = StudentChoice(state, self)  # a distillation's student: this model, or it with fewer layers
        self.student_title = QLabel("Student", self)
        self.student_title.setBuddy(self.student.whole)
        self.presets = load_presets()
        self.preset_box = QComboBox(self)
        self.preset_box.setObjectName("presetBox")
        self.preset_box.addItem("Choose a preset…")
        for p in self.presets:
            self.preset_box.addItem(p.name)
            self.preset_box.setItemData(self.preset_box.count() - 1, p.description, Qt.ItemDataRole.ToolTipRole)
        self.preset_box.activated.connect(self._preset_chosen)
        self.preset_note = QLabel(self)  # the preset last applied, so a chosen preset leaves a trace
        self.preset_note.setObjectName("presetNote")
        self.preset_note.setWordWrap(True)
        self.preset_note.hide()
        how = QGroupBox("Method", self)
        hlay = QVBoxLayout(how)
        hlay.addWidget(QLabel("Adapter, or full fine-tune", how))
        hlay.addWidget(self.method)
        hlay.addWidget(self.method_about)
        hlay.addWidget(self.method_error)
        hlay.addWidget(QLabel("Objective", how))
        hlay.addWidget(self.objective)
        hlay.addWidget(self.objective_about)
        hlay.addWidget(self.objective_error)
        hlay.addWidget(self.student_title)
        hlay.addWidget(self.student)
        hlay.addWidget(self.preset_box)
        hlay.addWidget(self.preset_note)

        self.gpus_box = QGroupBox("GPUs", self)
        self.gpus_box.setObjectName("gpusBox")
        self.gpus_box.setToolTip(PROCESSES_HELP)
        self.processes = QSpinBox(self.gpus_box)
        self.processes.setObjectName("processesSpin")
        self.processes.setRange(1, 1)
        self.processes.setToolTip(PROCESSES_HELP)
        self.processes.valueChanged.connect(state.set_processes)
        self.parallelism = Segmented(state, "parallelism", {p: PARALLELISM_LABELS[p] for p in PARALLELISMS}, self)
        self.parallelism_error = ErrorLabel(self)
        glay = QVBoxLayout(self.gpus_box)
        glay.addWidget(QLabel("Processes (one per GPU)", self.gpus_box))
        glay.addWidget(self.processes)
        glay.addWidget(QLabel("Parallelism", self.gpus_box))
        glay.addWidget(self.parallelism)
        glay.addWidget(self.parallelism_error)
        self.gpus_box.setVisible(False)  # shown when the engine reports two GPUs or more

        basics = QGroupBox("Hyper-parameters", self)
        self.basic_form = ConfigForm(state, BASIC, basics)
        QVBoxLayout(basics).addWidget(self.basic_form)
        self.advanced_toggle = QToolButton(self)
        self.advanced_toggle.setObjectName("advancedToggle")
        self.advanced_toggle.setText("Advanced")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_form = ConfigForm(state, ADVANCED, self)
        self.advanced_form.setVisible(False)
        self.advanced_toggle.toggled.connect(self._toggle_advanced)
        self.rewards_editor = RewardsEditor(state, self)
        self.rewards_editor.try_requested.connect(self.open_workbench)
        self.rewards_editor.added.connect(lambda box: QTimer.singleShot(0, lambda: self._show_reward(box)))
        self.generation_worker: GenerationWorker | None = None  # None: the window's shared one (see _worker)
        self._own_worker: GenerationWorker | None = None
        self.workbench: RewardWorkbench | None = None
        self.memory_panel = MemoryPanel(memory, self)
        self.start_button = QPushButton("Start training", self)
        self.start_button.setObjectName("startButton")
        self.start_button.setToolTip("Start the run (Ctrl+Enter)")
        self.start_button.clicked.connect(self.request_start)
        self.blockers = QLabel(self)
        self.blockers.setObjectName("startBlockers")
        self.blockers.setWordWrap(True)

        right = QWidget(self)
        rcol = QVBoxLayout(right)
        rcol.addWidget(how)
        rcol.addWidget(self.rewards_editor)
        rcol.addWidget(self.gpus_box)
        rcol.addWidget(basics)
        rcol.addWidget(self.advanced_toggle)
        rcol.addWidget(self.advanced_form)
        rcol.addStretch(1)
        scroll = QScrollArea(self)
        scroll.setObjectName("settingsScroll")
        self.settings_scroll = scroll
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(right)
        # wide enough for the settings (the advanced ones too) beside the scroll bar: the panel scrolls down, never
        # sideways
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        margins = rcol.contentsMargins().left() + rcol.contentsMargins().right()
        scroll.setMinimumWidth(
            max(right.minimumSizeHint().width(), self.advanced_form.minimumSizeHint().width() + margins)
            + scroll.verticalScrollBar().sizeHint().width()
        )
        side = QWidget(self)
        scol = QVBoxLayout(side)
        scol.setContentsMargins(0, 0, 0, 0)
        scol.addWidget(scroll, 1)
        scol.addWidget(self.memory_panel)
        scol.addWidget(self.blockers)
        scol.addWidget(self.start_button)
        split = QSplitter(self)
        split.addWidget(left)
        split.addWidget(side)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        QVBoxLayout(self).addWidget(split)

        self.device = None
        self.devices_job = EngineJob(self)  # `devices --json`: which GPUs torch can use (asked with 2+ GPUs)
        self.devices_job.done.connect(lambda report: self.set_device_report(report))
        self.probe = estimate.DeviceProbe()  # no parent: the thread may answer after the page is gone
        self.probe.found.connect(self._device_found)
        self.probe.gpus.connect(self._gpus_counted)
        self.probe.start()
        self._estimate_timer = QTimer(self, singleShot=True, interval=100)
        self._estimate_timer.timeout.connect(self._update_estimate)
        state.subscribe(self._on_state)
        self._sync_objective()
        self._sync_method()
        self._on_state("errors")
        self._update_estimate()
        guard_wheel(self)

    # --- behaviour ------------------------------------------------------------------
    def _toggle_advanced(self, on: bool) -> None:
        self.advanced_form.setVisible(on)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        if on:  # opened at the panel's bottom edge it showed two rows: scroll it into view, from its toggle down
            QTimer.singleShot(0, self._show_advanced)

    def _show_advanced(self) -> None:
        bar = self.settings_scroll.verticalScrollBar()
        bar.setValue(min(bar.maximum(), self.advanced_toggle.y()))

    def _preset_chosen(self, index: int) -> None:
        if index > 0:
            self.apply_preset(self.presets[index - 1])
        self.preset_box.setCurrentIndex(0)

    def apply_preset(self, preset: Preset) -> None:
        self.state.load(preset.config)
        self.preset_note.setText(f"Preset applied: {preset.name}. Its settings can be changed below.")
        self.preset_note.setToolTip(preset.description)
        self.preset_note.show()

    def _sync_method(self) -> None:
        chosen = method_table.BY_NAME.get(str(self.state.values.get("method", "")))
        self.method_about.setText(chosen.summary if chosen else "")

    def _sync_objective(self) -> None:
        """The chosen objective's sentence, the rewards editor for GRPO, and only its own objective-specific rows."""
        objective = str(self.state.values.get("objective", ""))
        self.objective_about.setText(OBJECTIVE_SENTENCES.get(objective, ""))
        self.objective_about.setVisible(objective in OBJECTIVE_SENTENCES)
        self.rewards_editor.setVisible(self.state.uses_rewards)
        for widget in (self.student_title, self.student):
            widget.setVisible(objective == "distill")
        for form in (self.basic_form, self.advanced_form):
            layout = form.layout()
            for name, editor in form.editors.items():
                owner = next((o for prefix, o in OBJECTIVE_PREFIXES.items() if name.startswith(prefix)), None)
                row = editor.parentWidget()  # the field's box: the editor and its error line
                if owner is not None and row is not None and isinstance(layout, QFormLayout):
                    layout.setRowVisible(row, objective == owner)

    def _show_reward(self, box: QWidget) -> None:
        """A reward just added: scrolled into view with the field that has the keyboard."""
        self.settings_scroll.ensureWidgetVisible(box, 0, 0)
        focus = QApplication.focusWidget()
        if focus is not None and box.isAncestorOf(focus):
            self.settings_scroll.ensureWidgetVisible(focus)

    def open_workbench(self) -> None:
        """The reward workbench for the set-up's model, adapter, dataset and rewards (one window, brought back)."""
        worker = self._worker()
        if self.workbench is None or self.workbench.worker is not worker:
            self.workbench = RewardWorkbench(self.state, worker, self)
        self.workbench.show()
        self.workbench.raise_()
        self.workbench.activateWindow()
        self.workbench.prepare()

    def _worker(self) -> GenerationWorker:
        """The generation worker the window shares between its pages (one model in memory), or, for a page on its
        own, one of the page's."""
        shared = self.generation_worker or getattr(self.window(), "generation_worker", None)
        if isinstance(shared, GenerationWorker):
            return shared
        if self._own_worker is None:
            self._own_worker = GenerationWorker(self, threads=1)
        return self._own_worker

    def _on_state(self, topic: str) -> None:
        if topic in ("values:objective", "values:*"):
            self._sync_objective()
        if topic in ("values:method", "values:*"):
            self._sync_method()
        if topic in ("model", "dataset", "processes"):
            self._estimate_timer.start()
        if topic in ("devices", "processes"):
            self._sync_gpus()
        if topic != "errors":
            return
        errors = self.state.errors
        self.method_error.show_error(errors.get("method", ""))
        self.objective_error.show_error(errors.get("objective", ""))
        self.parallelism_error.show_error(errors.get("parallelism", ""))
        self.start_button.setEnabled(self.state.ready)
        if errors:
            names = ", ".join(_in_sentence(label_for(name)) for name in sorted(errors))
            self.blockers.setText(f"Before starting, fix the settings marked in red: {names}.")
        else:
            self.blockers.setText("")
        self.blockers.setVisible(bool(errors))
        self._estimate_timer.start()

    def _device_found(self, device) -> None:
        self.device = device
        self._update_estimate()

    def _gpus_counted(self, n: int) -> None:
        """nvidia-smi lists two GPUs or more: ask the engine which ones a run can use (its torch's view)."""
        if n > 1:
            self.devices_job.run("devices", "--json")

    def set_device_report(self, report) -> None:
        """The engine's device report: with two GPUs or more the page offers several processes."""
        if isinstance(report, DeviceReport):
            self.state.set_devices(report)

    def _sync_gpus(self) -> None:
        st = self.state
        self.gpus_box.setVisible(st.several_gpus)
        self.processes.blockSignals(True)
        self.processes.setRange(1, st.max_processes)
        self.processes.setValue(st.processes)
        self.processes.blockSignals(False)
        self.parallelism.setEnabled(st.processes > 1)
        if st.devices is not None and st.several_gpus:
            names = ", ".join(f"{d.index}: {d.name}" for d in st.devices.gpus)
            self.processes.setToolTip(f"{PROCESSES_HELP}\nGPUs: {names}")

    def _estimate_device(self):
        """With several processes, the GPU with the least free memory of those the run uses (as the engine sees
        them): the run fits when it fits there. Else the probed device."""
        st = self.state
        if st.processes > 1 and st.devices is not None and st.devices.gpus:
            return min(st.devices.gpus[: st.processes], key=lambda d: d.available_bytes)
        return self.device

    def _update_estimate(self) -> None:
        st = self.state
        self.memory.set_estimate(
            estimate.estimate(st.config, st.model_info, self._estimate_device(), st.dataset_info, st.processes)
        )

    def shutdown(self) -> None:
        """Stop pending look-ups and kill running ones (the window is closing)."""
        for panel in (self.model_panel, self.dataset_panel):
            panel._debounce.stop()
            panel.job.cancel()
        self.model_panel._count_debounce.stop()
        self.model_panel.count_job.cancel()
        self.devices_job.cancel()
        self._estimate_timer.stop()
        if self.workbench is not None:
            self.workbench.job.cancel()
            self.workbench.close()
        if self._own_worker is not None:
            self._own_worker.shutdown()

    def request_start(self) -> None:
        if self.state.ready and isinstance(self.state.config, TrainConfig):
            self.start_requested.emit(self.state.config)


def _in_sentence(label: str) -> str:
    """A field's label inside a sentence: 'Learning rate' -> 'learning rate'; 'LoRA rank r' and 'LR' stay."""
    return label if label[:2].isupper() else label[:1].lower() + label[1:]
