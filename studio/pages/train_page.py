"""Train: live curves, progress with ETA, Stop / Resume / Export, the failure message, the log; for an online RL run
its rewards, KL, answer length and clipped fraction, and its rollouts (sortable, any of them sent to Annotate); for a
reward model its held-out accuracy and gap; for a distillation its divergence to the teacher and task loss, and at its
end the student's generation speed beside the teacher's."""

from __future__ import annotations

import json

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.run_status import RunStatus, is_exportable, is_resumable
from finetune_studio.studio.state.distill import speed_details, speed_line
from finetune_studio.studio.state.run import MemoryState, RunState, format_bytes, format_duration
from finetune_studio.studio.widgets.charts import TrainingCharts
from finetune_studio.studio.widgets.distill_charts import DistillCharts
from finetune_studio.studio.widgets.log_view import LogView
from finetune_studio.studio.widgets.memory_panel import MemoryBar
from finetune_studio.studio.widgets.rl_charts import RLCharts
from finetune_studio.studio.widgets.rollouts_view import RolloutsView

STATUS_TEXT = {
    "idle": "No run yet",  # the app's own states around a run's stored ones
    "starting": "Starting…",
    "stopping": "Stopping…",
    RunStatus.RUNNING: "Training",
    RunStatus.COMPLETED: "Completed",
    RunStatus.STOPPED: "Stopped",
    RunStatus.FAILED: "Failed",
    RunStatus.INTERRUPTED: "Interrupted",
    RunStatus.CREATED: "Not started",
}


class TrainPage(QWidget):
    stop_requested = Signal()
    resume_requested = Signal(str)
    export_requested = Signal(str)
    new_run_requested = Signal()
    annotate_requested = Signal(list, list)  # rollouts to label, and their groups (studio.state.rollouts.Rollout)

    def __init__(self, state: RunState, memory: MemoryState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state, self.memory = state, memory
        self.title = QLabel("No run yet", self)
        self.title.setObjectName("runTitle")
        self.status = QLabel(self)
        self.status.setObjectName("runStatus")
        self.progress = QProgressBar(self)
        self.progress.setObjectName("runProgress")
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.stop_button = QPushButton("Stop", self)
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Save a checkpoint and stop (Ctrl+.)")
        self.stop_button.clicked.connect(self.stop_requested)
        self.resume_button = QPushButton("Resume", self)
        self.resume_button.setObjectName("resumeButton")
        self.resume_button.setToolTip("Continue from the last checkpoint")
        self.resume_button.clicked.connect(lambda: self.resume_requested.emit(self.state.info.run_id))
        self.export_button = QPushButton("Export", self)
        self.export_button.setObjectName("exportButton")
        self.export_button.clicked.connect(lambda: self.export_requested.emit(self.state.info.run_id))
        self.new_button = QPushButton("New run", self)
        self.new_button.clicked.connect(self.new_run_requested)
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addWidget(self.status)
        head.addStretch(1)
        for b in (self.stop_button, self.resume_button, self.export_button, self.new_button):
            head.addWidget(b)
        self.message = QLabel(self)
        self.message.setObjectName("runMessage")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.hide()
        self.memory_bar = MemoryBar(memory, self)
        self.memory_bar.setToolTip("Memory: estimate (blue), in use (green), peak (line), device total (bar).")
        self.memory_label = QLabel(self)
        self.memory_label.setObjectName("memoryLine")
        memory.subscribe(lambda _topic: self._show_memory())
        self.charts = TrainingCharts(state, self)
        self.rl_charts = RLCharts(state, self)
        self.distill_charts = DistillCharts(state, self)
        self.rollouts_view = RolloutsView(state.rollouts, self)
        self.rollouts_view.send_requested.connect(self.annotate_requested)
        self.chart_tabs = QTabWidget(self)
        self.chart_tabs.setObjectName("chartTabs")
        self.chart_tabs.setDocumentMode(True)
        self.chart_tabs.addTab(self.charts, "Loss and speed")
        self.chart_tabs.addTab(self.rl_charts, "Rewards")
        self.chart_tabs.addTab(self.rollouts_view, "Rollouts")
        self.chart_tabs.addTab(self.distill_charts, "Distillation")
        self._rl_shown_for = ""  # the run whose own charts were brought forward once (a person's choice of tab stays)
        state.rollouts.subscribe(lambda _topic: self._show_rl_tabs())
        self.log_view = LogView(state, self)
        self.config_view = QPlainTextEdit(self)
        self.config_view.setObjectName("configView")
        self.config_view.setReadOnly(True)
        self.samples_view = QPlainTextEdit(self)
        self.samples_view.setObjectName("samplesView")
        self.samples_view.setReadOnly(True)
        self.samples_view.setPlaceholderText("What the model answers to fixed validation prompts at each evaluation")
        self.best_label = QLabel(self)
        self.best_label.setObjectName("bestCheckpoint")
        self.best_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.best_label.hide()
        self.speed_label = QLabel(self)  # a distillation's student timed beside its teacher, at the run's end
        self.speed_label.setObjectName("distillSpeed")
        self.speed_label.setWordWrap(True)
        self.speed_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.speed_label.hide()
        tabs = QTabWidget(self)
        tabs.addTab(self.log_view, "Log")
        tabs.addTab(self.samples_view, "Samples")
        tabs.addTab(self.config_view, "Config")
        split = QSplitter(Qt.Orientation.Vertical, self)
        split.addWidget(self.chart_tabs)
        split.addWidget(tabs)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)  # the log and samples readable (they were four lines tall)
        split.setChildrenCollapsible(False)
        split.setHandleWidth(7)  # a handle a person can see and grab
        tabs.setMinimumHeight(120)
        lay = QVBoxLayout(self)
        lay.addLayout(head)
        lay.addWidget(self.progress)
        lay.addWidget(self.message)
        lay.addWidget(self.best_label)
        lay.addWidget(self.speed_label)
        mem_row = QHBoxLayout()
        mem_row.addWidget(self.memory_label)
        mem_row.addWidget(self.memory_bar, 1)
        lay.addLayout(mem_row)
        lay.addWidget(split, 1)
        self._progress_timer = QTimer(self, singleShot=True, interval=200)
        self._progress_timer.timeout.connect(self._show_progress)
        state.subscribe(self._on_state)
        self._show_status()
        self._show_info()
        self._show_progress()
        self._show_memory()
        self._show_samples()
        self._show_rl_tabs()
        self._show_speed()

    def _objective_tabs(self) -> dict[QWidget, bool]:
        """The objective's own tabs and whether the run has them."""
        rollouts = bool(len(self.state.rollouts)) or self.rl_charts.has_grpo
        return {
            self.rl_charts: self.rl_charts.has_any,
            self.rollouts_view: rollouts,
            self.distill_charts: self.distill_charts.has_any,
        }

    def _show_rl_tabs(self) -> None:
        """The Rewards and Rollouts tabs for an online RL run or a reward model, the Distillation tab for a
        distillation (its first chart tab brought forward once per run); an SFT or DPO run shows its loss charts alone,
        as before."""
        tabs = self.chart_tabs
        shown = self._objective_tabs()
        for widget, on in shown.items():
            tabs.setTabVisible(tabs.indexOf(widget), on)
        tabs.tabBar().setVisible(any(shown.values()))
        first = next((w for w in (self.rl_charts, self.distill_charts) if shown[w]), None)
        run = self.state.info.run_id or self.state.info.name
        if first is not None and run and self._rl_shown_for != run:
            self._rl_shown_for = run
            tabs.setCurrentWidget(first)
        elif not tabs.isTabVisible(tabs.currentIndex()):
            tabs.setCurrentIndex(0)

    def _show_speed(self) -> None:
        """A distillation's student beside its teacher: generation speed, measured at the run's end."""
        speed = self.state.distill_speed
        self.speed_label.setVisible(speed is not None)
        if speed is not None:
            self.speed_label.setText(speed_line(speed))
            self.speed_label.setToolTip(speed_details(speed))

    def _show_samples(self) -> None:
        """The samples, newest evaluation first, and the best checkpoint under early stopping."""
        st = self.state
        blocks = []
        for step in sorted(st.samples, reverse=True):
            mark = "  (best)" if step == st.best_step else ""
            lines = [f"Step {step}{mark}"]
            for prompt, answer in st.samples[step]:
                lines += [f"  Q: {prompt}", "  A: " + answer.replace("\n", "\n     ")]
            blocks.append("\n".join(lines))
        text = "\n\n".join(blocks)
        if self.samples_view.toPlainText() != text:
            self.samples_view.setPlainText(text)
        if st.best_step is None:
            self.best_label.hide()
            return
        loss = f", eval loss {st.best_eval_loss:.4f}" if st.best_eval_loss is not None else ""
        where = f": {st.best_checkpoint}" if st.best_checkpoint else ""
        self.best_label.setText(f"Best checkpoint (early stopping): step {st.best_step}{loss}{where}")
        self.best_label.show()

    def _show_memory(self) -> None:
        m, est = self.memory, self.memory.estimate
        bits = [f"in use {format_bytes(m.used_bytes)}", f"peak {format_bytes(m.peak_bytes)}"] if m.peak_bytes else []
        if est.total_bytes:
            bits.append(f"budget {format_bytes(est.total_bytes)}")
        if est.device_total_bytes:  # the engine's figure is the device's total; a reopened run's, what was free
            which = "total" if self.state.memory_total_bytes else "free at the start"
            bits.append(f"device {format_bytes(est.device_total_bytes)} {which}")
        self.memory_label.setText("Memory: " + (" · ".join(bits) if bits else "–"))

    def _on_state(self, topic: str) -> None:
        if topic == "status":
            self._show_status()
            self._show_progress()
        elif topic == "info":
            self._show_info()
            self._show_rl_tabs()
        elif topic == "samples":
            self._show_samples()
        elif topic == "distill_speed":
            self._show_speed()
            self._show_progress()
        elif topic in ("metrics", "progress") and not self._progress_timer.isActive():
            self._progress_timer.start()
        if topic == "metrics" and any(
            on != self.chart_tabs.isTabVisible(self.chart_tabs.indexOf(w)) for w, on in self._objective_tabs().items()
        ):
            self._show_rl_tabs()

    def _show_info(self) -> None:
        info = self.state.info
        self.title.setText(f"<b>{info.name or info.run_id or 'No run yet'}</b>")
        self.config_view.setPlainText(json.dumps(info.config, indent=2, sort_keys=True) if info.config else "")

    def _show_status(self) -> None:
        st = self.state
        self.status.setText(STATUS_TEXT.get(st.status, st.status))
        self.status.setProperty("status", st.status)
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)
        self.stop_button.setEnabled(st.status in ("starting", "running"))
        self.resume_button.setEnabled(bool(st.info.run_id) and is_resumable(st.status))
        self.export_button.setEnabled(bool(st.info.run_id) and is_exportable(st.status))
        text = st.message
        if st.status == "failed" and text:
            kind = {"oom": "Out of memory", "config": "Settings", "data": "Dataset", "model": "Model"}.get(
                st.message_kind or "", "The run failed"
            )
            text = f"<b>{kind}:</b> {_html(text)}"
        else:
            text = _html(text)
        self.message.setText(text)
        self.message.setProperty("failed", st.status == "failed")
        self.message.style().unpolish(self.message)
        self.message.style().polish(self.message)
        self.message.setVisible(bool(st.message))

    def _show_progress(self) -> None:
        st = self.state
        if st.progress is not None and st.status == "starting":
            p = st.progress
            self.progress.setRange(0, max(p.total, 1))
            self.progress.setValue(p.done)
            self.progress.setFormat(f"{p.message or p.stage} ({p.done}/{p.total})")
            return
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(st.fraction * 1000))
        total = st.info.total_steps
        bits = [f"step {st.step:,} / {total:,}" if total else f"step {st.step:,}"]
        if st.elapsed_s:
            bits.append(f"{format_duration(st.elapsed_s)} elapsed")
        eta = st.eta_s() if st.status == "running" else None
        if eta is not None:
            bits.append(f"about {format_duration(eta)} left")
        reward = st.figures.last("reward")
        loss = st.train.last("loss_smooth")
        if reward is not None:  # an online RL run: its reward says how it goes (its loss hovers around 0)
            bits.append(f"mean reward {reward:.3g}")
        elif loss is not None:
            bits.append(f"smoothed loss {loss:.4f}")  # Runs' figure is the last step's own loss
        if self.distill_charts.has_any:  # a distillation: its two parts, the last step's
            kl, ce = st.figures.last("kl"), st.figures.last("ce")
            bits += [f"{name} {v:.3g}" for name, v in (("KL", kl), ("CE", ce)) if v is not None]
            timing = st.info.config.get("distill_measure_speed", True) and st.distill_speed is None
            if timing and st.status == "running" and total and st.step >= total:  # the engine times both models
                bits.append("timing the student's generation against the teacher's…")
        if st.status == "starting":
            bits = ["loading the model and data…"]
        self.progress.setFormat(" · ".join(bits))


def _html(text: str) -> str:
    import html

    return html.escape(text).replace("\n", "<br>")
