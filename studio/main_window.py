"""The main window: Set up, Train, Runs, Annotate and Compare pages, shortcuts, remembered choices, closing."""

from __future__ import annotations

from PySide6.QtCore import QByteArray, QTimer
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import QMainWindow, QMessageBox, QTabWidget

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.protocol.events import ExportResult
from finetune_studio.core.store import Store
from finetune_studio.studio import probe
from finetune_studio.studio.pages.annotate.page import AnnotatePage
from finetune_studio.studio.pages.compare_page import ComparePage
from finetune_studio.studio.pages.runs_page import RunsPage
from finetune_studio.studio.pages.setup_page import SetupPage
from finetune_studio.studio.pages.train_page import TrainPage
from finetune_studio.studio.services.generation_worker import GenerationWorker
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.services.run_controller import RunController
from finetune_studio.studio.state.rollouts import SendError, send_to_annotate
from finetune_studio.studio.state.run import MemoryState, RunState
from finetune_studio.studio.state.run_labels import run_label
from finetune_studio.studio.state.settings import Settings
from finetune_studio.studio.state.setup import SetupState
from finetune_studio.studio.widgets.export_dialog import ExportDialog, ExportOptionsDialog
from finetune_studio.studio.widgets.wheel_guard import guard_wheel

TITLE = "Finetune Studio"
SETUP, TRAIN, RUNS, ANNOTATE, COMPARE = range(5)


class MainWindow(QMainWindow):
    def __init__(self, settings: Settings | None = None, store_factory=Store):
        super().__init__()
        self.setWindowTitle(TITLE)
        self.settings = settings or Settings()
        self.setup_state = SetupState(initial=self.settings.get("last_config") or {})
        self.setup_memory, self.run_memory, self.run_state = MemoryState(), MemoryState(), RunState()
        self.controller = RunController(self.run_state, self.run_memory, parent=self)
        self._store_factory = store_factory
        self.setup_page = SetupPage(self.setup_state, self.setup_memory, self.settings.get("recent_models", []))
        self.train_page = TrainPage(self.run_state, self.run_memory)
        self.runs_page = RunsPage(lambda: self.controller.store)
        self.generation_worker = GenerationWorker(self, threads=1)  # one model in memory for both pages
        model = lambda: str(self.setup_state.values["model"])
        self.annotate_page = AnnotatePage(lambda: self.controller.store, model, self.generation_worker)
        self.compare_page = ComparePage(lambda: self.controller.store, self.generation_worker, model)
        self.tabs = QTabWidget(self)
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.setup_page, "1  Set up")
        self.tabs.addTab(self.train_page, "2  Train")
        self.tabs.addTab(self.runs_page, "3  Runs")
        self.tabs.addTab(self.annotate_page, "4  Annotate")
        self.tabs.addTab(self.compare_page, "5  Compare")
        self.tabs.currentChanged.connect(self._page_changed)
        self.setCentralWidget(self.tabs)
        self.export_job = EngineJob(self)
        self.export_dialog = ExportDialog(self.export_job, self)
        self.export_job.done.connect(self._exported)
        self.export_job.failed.connect(lambda msg: self._tell("Export failed", msg))
        self.close_choice: str | None = None  # tests set "stop" / "continue" / "cancel" instead of asking
        self._closing = ""  # "stop" or "continue" while waiting for the run to let go

        self.setup_page.start_requested.connect(self.start_run)
        self.train_page.stop_requested.connect(self.stop_run)
        self.train_page.resume_requested.connect(self.resume_run)
        self.train_page.export_requested.connect(self.export_run)
        self.train_page.new_run_requested.connect(lambda: self.tabs.setCurrentIndex(SETUP))
        self.train_page.annotate_requested.connect(self.send_rollouts_to_annotate)
        self.runs_page.open_requested.connect(self.open_run)
        self.runs_page.new_from_config.connect(self.new_from_config)
        self.runs_page.resume_requested.connect(self.resume_run)
        self.runs_page.export_requested.connect(self.export_run)
        self.runs_page.export_as_requested.connect(self.export_run_as)
        self.runs_page.message.connect(lambda text: self.statusBar().showMessage(text, 15000))
        self.annotate_page.train_dpo_requested.connect(self.train_dpo)
        self.annotate_page.message.connect(lambda text: self.statusBar().showMessage(text, 8000))
        self.compare_page.message.connect(lambda text: self.statusBar().showMessage(text, 8000))
        self.controller.run_ended.connect(self._run_ended)
        self._shortcuts()
        self._restore()
        guard_wheel(self)  # every page's drop-downs and spin boxes take the wheel only once focused
        probe.install(self)  # the end-to-end tests' read-only view (off unless they ask for it)
        self.statusBar().showMessage("Ready.", 3000)
        QTimer.singleShot(0, self._find_live_run)
        QTimer.singleShot(0, self.setup_page.model_panel.resolve)
        QTimer.singleShot(0, self.setup_page.dataset_panel.inspect)

    # --- set-up ---------------------------------------------------------------------
    def _shortcuts(self) -> None:
        # Start belongs to Set up and Train: elsewhere Ctrl+Return is the page's own (Annotate saves an edit with it).
        self.start_shortcuts = [
            QShortcut(QKeySequence(key), self, activated=self.setup_page.request_start)  # type: ignore[call-overload]
            for key in ("Ctrl+Return", "Ctrl+Enter")
        ]
        for keys, slot in (
            (("Ctrl+.",), self.stop_run),
            (("Ctrl+1",), lambda: self.tabs.setCurrentIndex(SETUP)),
            (("Ctrl+2",), lambda: self.tabs.setCurrentIndex(TRAIN)),
            (("Ctrl+3",), lambda: self.tabs.setCurrentIndex(RUNS)),
            (("Ctrl+4",), lambda: self.tabs.setCurrentIndex(ANNOTATE)),
            (("Ctrl+5",), lambda: self.tabs.setCurrentIndex(COMPARE)),
            (("Ctrl+Q",), self.close),
            (("F5",), self.runs_page.refresh),
        ):
            for key in keys:
                QShortcut(QKeySequence(key), self, activated=slot)  # type: ignore[call-overload]

    def _restore(self) -> None:
        geometry = self.settings.get("geometry")
        if geometry:
            self.restoreGeometry(QByteArray.fromHex(geometry.encode()))
        else:  # first start: a comfortable size that fits the screen (1024 x 768 included)
            screen = self.screen().availableGeometry()
            self.resize(min(1280, screen.width()), min(860, screen.height()))
        self.setup_page.advanced_toggle.setChecked(bool(self.settings.get("show_advanced", False)))

    def remember(self) -> None:
        self.settings.set("last_config", self.setup_state.config_dict())
        self.settings.set("geometry", bytes(self.saveGeometry().toHex()).decode())  # type: ignore[call-overload]
        self.settings.set("show_advanced", self.setup_page.advanced_toggle.isChecked())
        model = str(self.setup_state.values["model"])
        recent = [m for m in self.settings.get("recent_models", []) if m != model]
        self.settings.set("recent_models", ([model] + recent)[:8] if model else recent)
        self.settings.save()

    def _page_changed(self, index: int) -> None:
        for shortcut in self.start_shortcuts:
            shortcut.setEnabled(index in (SETUP, TRAIN))
        if index == RUNS:
            self.runs_page.refresh()
        elif index == ANNOTATE:
            self.annotate_page.refresh()
            self.annotate_page.label_view.setFocus()
        elif index == COMPARE:
            self.compare_page.refresh()

    def _tell(self, title: str, message: str) -> None:
        self.statusBar().showMessage(f"{title}: {message.splitlines()[0] if message else ''}", 15000)
        self.run_state.add_log(f"{title}: {message}")

    # --- runs -----------------------------------------------------------------------
    def start_run(self, config: TrainConfig) -> None:
        if self.controller.busy:
            self.statusBar().showMessage("A run is already training; stop it first (Ctrl+.).", 6000)
            return
        self.remember()
        self.setup_page._update_estimate()  # for exactly this config, not the one 100 ms ago
        self.controller.start(config, self.setup_state.processes)
        budget = self.setup_memory.estimate  # the engine's 'started' event may refine it
        self.run_memory.set_estimate(budget)
        self.run_state.memory_budget_bytes = budget.total_bytes
        self.tabs.setCurrentIndex(TRAIN)

    def stop_run(self) -> None:
        self.controller.stop()

    def resume_run(self, run_id: str) -> None:
        if run_id and not self.controller.busy:
            self.controller.resume(run_id)
            self.tabs.setCurrentIndex(TRAIN)

    def open_run(self, run_id: str) -> None:
        if self.controller.open_run(run_id):
            self.tabs.setCurrentIndex(TRAIN)
        else:
            self.statusBar().showMessage("Stop the current run before opening another one.", 6000)

    def send_rollouts_to_annotate(self, chosen: list, group: list) -> None:
        """From the train page: the chosen rollouts into the store and the run's labelling session, opened in
        Annotate (studio.state.rollouts.send_to_annotate)."""
        info = self.run_state.info
        key = f"{info.config.get('objective') or 'grpo'}_temperature"  # grpo_temperature, ppo_temperature
        sampled = {"temperature": info.config[key]} if key in info.config else None
        try:
            sent = send_to_annotate(
                self.controller.store.preferences,
                chosen,
                run_id=info.run_id,
                run_name=info.name,
                model=str(info.config.get("model") or "default"),
                group=group,
                sampling=sampled,
            )
        except (SendError, ValueError) as exc:
            self.train_page.rollouts_view.say(str(exc))
            self.statusBar().showMessage(str(exc), 8000)
            return
        self.train_page.rollouts_view.say("")
        if self.annotate_page.generator.running:
            self.statusBar().showMessage(f"{sent.message} Annotate is generating: open it from there.", 10000)
            return
        self.annotate_page.open_session(sent.session)
        self.tabs.setCurrentIndex(ANNOTATE)
        self.statusBar().showMessage(sent.message, 10000)

    def new_from_config(self, config: dict) -> None:
        self.setup_state.load(config)
        self.tabs.setCurrentIndex(SETUP)
        self.statusBar().showMessage("Settings loaded from the past run; adjust them and press Start.", 6000)

    def train_dpo(self, config: dict) -> None:
        """From the annotate page: Set up with the DPO objective on the store's pairs, from the candidates' adapter."""
        self.setup_state.load(config)
        self.tabs.setCurrentIndex(SETUP)
        start = f" from {self._run_named(config['init_adapter'])}" if config.get("init_adapter") else ""
        self.statusBar().showMessage(f"DPO on {config['dataset']}{start}: check the settings and press Start.", 8000)

    def _run_named(self, ref: str) -> str:
        """A run (``RUN`` or ``RUN:checkpoint``) as a person knows it: by its name; other references as they are."""
        run_id, colon, part = ref.partition(":")
        run = self.controller.store.get_run(run_id) if run_id else None
        return (run_label(run) + (f" ({part})" if colon else "")) if run is not None else ref

    def export_run(self, run_id: str) -> None:
        """One click: the adapter, checked, in the data directory's exports/ folder."""
        if run_id:
            self.statusBar().showMessage(f"Exporting {self._run_named(run_id)}…")
            self.export_dialog.start(run_id)

    def choose_export_options(self, run_id: str):
        """Export as...: the person's choice of place, checkpoint and formats (None: cancelled)."""
        run = self.controller.store.get_run(run_id)
        dialog = ExportOptionsDialog(run_id, run.run_dir if run else "", self)
        return dialog.options() if dialog.exec() else None

    def export_run_as(self, run_id: str) -> None:
        options = self.choose_export_options(run_id) if run_id else None
        if options is not None:
            self.statusBar().showMessage(f"Exporting {self._run_named(run_id)}…")
            self.export_dialog.start(run_id, options)

    def _exported(self, result) -> None:
        if isinstance(result, ExportResult):
            word = "Exported and checked" if result.passed else "Exported, but the check FAILED"
            self.statusBar().showMessage(f"{word}: {result.path}", 15000)

    def _find_live_run(self) -> None:
        run_id = self.controller.find_live_run()
        if run_id and self.controller.open_run(run_id):
            self.tabs.setCurrentIndex(TRAIN)
            self.statusBar().showMessage("A run is still training in the background; following it.", 8000)

    def _run_ended(self, _outcome) -> None:
        if self.runs_page.isVisible():
            self.runs_page.refresh()
        if self._closing:
            self._closing = "done"
            self.close()

    # --- closing --------------------------------------------------------------------
    def ask_close_choice(self) -> str:
        if self.close_choice:
            return self.close_choice
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "A run is training",
            "A run is still training. Stop it (a checkpoint is saved and it can be resumed), "
            "or let it continue in the background? The app finds it again when you reopen it.",
            parent=self,
        )
        stop = box.addButton("Stop the run", QMessageBox.ButtonRole.DestructiveRole)
        keep = box.addButton("Keep training", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        return "stop" if box.clickedButton() is stop else "continue" if box.clickedButton() is keep else "cancel"

    def closeEvent(self, event) -> None:
        if self._closing not in ("", "done"):
            event.ignore()  # waiting for the run to stop or let go
            return
        if self._closing == "" and self.controller.busy:
            choice = self.ask_close_choice()
            if choice == "cancel":
                event.ignore()
                return
            if self.controller.proc.running:
                self._closing = choice
                self.statusBar().showMessage("Stopping the run…" if choice == "stop" else "Letting the run go on…")
                self.controller.stop() if choice == "stop" else self.controller.detach()
                event.ignore()
                return
            if choice == "stop":
                self.controller.stop()
        self.remember()
        self.shutdown()
        event.accept()

    def shutdown(self) -> None:
        """Stop timers and background look-ups; our training child is left as the person chose."""
        self.controller.follow_timer.stop()
        self.setup_page.shutdown()
        self.export_job.cancel()
        self.annotate_page.shutdown()
        self.generation_worker.shutdown()
