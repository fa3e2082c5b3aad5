"""Annotate: set up a labelling session, generate its answers in the worker, label pairs by keyboard, export.

The page joins the session form (``session_form``: what to generate), the label view (``label_view``: the keys) and
the Qt-free state (``studio.state.annotate``: which pair, the strength, the open edit or ranking). Keys (on the label
view, shown on screen): A / B the left / right answer is better, T tie, X both bad, S skip, E edit the left answer
(Shift+E the right one; Ctrl+Return or Save saves, Esc or Cancel cancels), R rank every answer to the prompt, 1-3 the
strength of the next A / B, Ctrl+Z undo, Right / Down / J next, Left / Up / K previous, M Markdown view, D word diff.
Every decision is written to the store at once.

Above the answers, the queue's order (as added, random, least sure first, largest predicted gap first) and the scorer
whose predictions order it (a reward model, or a DPO run's adapter by its implicit reward), scored in the generation
worker (``scoring``); below them, how often that model agreed with the person's last decisions. The model's guess for
the pair on screen is never shown before the person has decided it.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core import label_queue as lq
from finetune_studio.core.protocol.pairs_report import PairsExported, PairsImported
from finetune_studio.core.run_status import is_exportable
from finetune_studio.studio.pages.annotate.label_view import LabelView, word_diff_html
from finetune_studio.studio.pages.annotate.scoring import SessionScorer
from finetune_studio.studio.pages.annotate.session_form import SessionForm, SideBox
from finetune_studio.studio.services.annotation_generation import SessionGenerator
from finetune_studio.studio.services.generation_worker import GenerationWorker
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.annotate import AnnotateState, Key
from finetune_studio.studio.state.run_labels import field, run_labels

EXPORT_FORMATS = ("trl", "trl-conversational", "llama-factory")
__all__ = ["AnnotatePage", "SideBox", "word_diff_html"]  # Compare picks its models with the same box


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
        self.setObjectName("annotatePage")
        self._store = store_getter
        self._model = model_getter
        self._own_worker = worker is None
        self.worker = worker or GenerationWorker(self, threads=1)
        self.generator = SessionGenerator(self.worker, self)
        self.scoring = SessionScorer(self.worker, self)
        self._scorer_runs: dict[str, an.Scorer] = {}  # run id -> the scorer it offers
        self._done_when_scoring = -1  # decisions made when the scoring started
        self.state = AnnotateState()
        self.last_snapshot = ""
        self._pairs_job = EngineJob(self)  # engine pairs import / export
        self._pairs_job.done.connect(self._pairs_done)
        self._pairs_job.failed.connect(self._pairs_failed)
        self._pairs_what, self._pairs_then = "", lambda _event: None
        self.choose_export_dir = lambda: QFileDialog.getExistingDirectory(self, "Export the pairs to…")
        self.choose_import_file = lambda: QFileDialog.getOpenFileName(
            self, "Import preference pairs", "", "Preference data (*.jsonl *.json *.parquet *.csv)"
        )[0]
        self.choose_prompts_file = lambda: QFileDialog.getOpenFileName(
            self, "Prompts from a dataset", "", "Datasets (*.jsonl *.json)"
        )[0]
        self.choose_scorer_folder = lambda: QFileDialog.getExistingDirectory(
            self, "A reward model's folder, or an adapter folder"
        )
        self._build()
        self.generator.progress.connect(self._on_progress)
        self.generator.streaming.connect(self._on_stream)
        self.generator.items_added.connect(self.state.items_added)
        self.generator.finished.connect(self._on_generated)
        self.worker.died.connect(lambda msg: self._say(msg))
        self.scoring.scored.connect(self.state.add_rewards)
        self.scoring.progress.connect(self._on_scoring_progress)
        self.scoring.finished.connect(self._on_scored)
        self.order_box.currentIndexChanged.connect(lambda _i: self._order_chosen())
        self.scorer_box.activated.connect(lambda _i: self._scorer_chosen())
        scorer_edit = self.scorer_box.lineEdit()
        assert scorer_edit is not None  # an editable combo box has one
        scorer_edit.editingFinished.connect(self._scorer_chosen)
        self.scorer_folder_button.clicked.connect(self._choose_scorer_folder)
        self.label_view.key.connect(self.state.press)
        self.state.subscribe(self._on_state)
        f = self.form
        f.open_requested.connect(self.open_session)
        f.generate_requested.connect(self.generate)
        f.stop_requested.connect(self.generator.stop)
        f.annotator_changed.connect(self._annotator_changed)
        f.load_prompts_button.clicked.connect(self._choose_prompts_file)

    # --- building -------------------------------------------------------------------
    def _build(self) -> None:
        self.form = SessionForm(self)
        right = QWidget(self)
        self.order_box = QComboBox(right)
        self.order_box.setObjectName("queueOrder")
        for name, text in lq.ORDERS.items():
            self.order_box.addItem(text, name)
        self.order_box.setToolTip(
            "The order of the pairs to label. Least sure first: the pairs the scorer is closest to a tie on, where a "
            "label teaches most; largest predicted gap first: those it is surest about."
        )
        self.scorer_box = QComboBox(right)
        self.scorer_box.setObjectName("queueScorer")
        self.scorer_box.setEditable(True)
        self.scorer_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.scorer_box.setMinimumContentsLength(12)
        scorer_edit = self.scorer_box.lineEdit()
        assert scorer_edit is not None  # an editable combo box has one
        scorer_edit.setPlaceholderText("no scorer")
        self.scorer_box.setToolTip(
            "What predicts which answer is better: a reward run (its reward model), a DPO run (its adapter's implicit "
            "reward against the model it started from), or a folder of either"
        )
        self.scorer_folder_button = QPushButton("Folder…", right)
        self.scorer_folder_button.setObjectName("scorerFolder")
        self.scorer_folder_button.setToolTip("A reward model's folder, or an adapter folder (implicit reward)")
        order_row = QHBoxLayout()
        order_row.addWidget(QLabel("Order", right))
        order_row.addWidget(self.order_box)
        order_row.addWidget(QLabel("Scorer", right))
        order_row.addWidget(self.scorer_box, 1)
        order_row.addWidget(self.scorer_folder_button)
        self.label_view = LabelView(self.state, right)
        self.progress_label = QLabel(right)
        self.progress_label.setObjectName("labelProgress")
        self.progress_label.setWordWrap(True)
        self.agreement_label = QLabel(right)
        self.agreement_label.setObjectName("labelAgreement")
        self.agreement_label.setWordWrap(True)
        self.agreement_label.setToolTip(
            "Counted over your last picks of a side (ties, both bad and skips are not picks), once decided: the "
            "model's guess for the pair on screen is never shown before you decide."
        )
        self.policy = QLabel(right)
        self.policy.setObjectName("pairsPolicy")
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
        rcol.addLayout(order_row)
        rcol.addWidget(self.label_view, 1)
        rcol.addWidget(self.progress_label)
        rcol.addWidget(self.agreement_label)
        rcol.addWidget(self.policy)
        rcol.addLayout(bottom)
        splitter = QSplitter(self)
        splitter.addWidget(self.form)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 3)
        splitter.setChildrenCollapsible(False)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self._refresh_progress()

    # --- what the page shows of its state -------------------------------------------
    @property
    def store(self):
        return self._store()

    @property
    def spec(self) -> an.SessionSpec | None:
        return self.state.spec

    @property
    def labeller(self) -> an.Labeller | None:
        return self.state.labeller

    @property
    def index(self) -> int:
        return self.state.index

    @property
    def editing(self) -> str:
        return self.state.editing

    @property
    def item(self) -> an.Item | None:
        return self.state.item

    def on_key(self, key: Key) -> None:
        self.state.press(key)

    def _on_state(self, topic: str) -> None:
        if topic == "message":
            self._say(self.state.message)
        elif topic in ("item", "session"):
            self._refresh_progress()
        elif topic == "queue":
            self._show_queue()
        elif topic == "editing" and not self.state.editing:
            self._refresh_progress()

    def _say(self, text: str) -> None:
        self.form.status.setText(text)
        if text:
            self.message.emit(text.splitlines()[0])

    def _refresh_progress(self) -> None:
        st = self.state
        p = st.progress()
        self._refresh_agreement()
        if p is None or st.labeller is None:
            self.progress_label.setText("")
            self._refresh_policy()
            return
        rate = f"{p.left_rate:.0%}" if p.left_rate is not None else "–"
        done = "all labelled" if p.remaining == 0 else f"{p.remaining} remaining"
        self.progress_label.setText(
            f"{p.done} done, {done} · {an.plural(p.ties, 'tie')} · {p.both_bad} both bad · "
            f"{an.plural(p.skips, 'skip')} · {an.plural(p.edits, 'edit')} · left picks {rate}"
            + (f" · {p.per_hour:.0f} per hour" if p.per_hour else "")
            + "".join(
                f" · κ {k:.2f} with {other or 'no name'} ({an.plural(n, 'item')})"
                for other, (k, n) in an.agreement(st.labeller, st.items).items()
            )
        )
        self._refresh_policy()

    def _refresh_policy(self) -> None:
        prefs = self.store.preferences
        self.policy.setText(
            f"{an.plural(len(prefs.pairs()), 'DPO pair')} in the store. " + an.policy_text(prefs.left_out())
        )

    # --- the queue's order and its scorer -------------------------------------------
    def _refresh_agreement(self) -> None:
        """Decisions already made only (the state counts those); nothing about the pair on screen."""
        st = self.state
        if st.labeller is None or st.scorer is None:
            self.agreement_label.setText("")
            self.agreement_label.hide()  # no empty line without a scorer
            return
        self.agreement_label.setText(f"{st.agreement().text()} (scorer: {st.scorer.label()})")
        self.agreement_label.show()

    def _show_queue(self) -> None:
        """The order and scorer boxes as the state has them (a reopened session's own)."""
        st = self.state
        self.order_box.blockSignals(True)
        self.order_box.setCurrentIndex(max(0, self.order_box.findData(st.order)))
        self.order_box.blockSignals(False)
        scorer = st.scorer
        self.scorer_box.blockSignals(True)
        if scorer is None:
            self.scorer_box.setCurrentIndex(-1)
            self.scorer_box.setEditText("")
        else:
            i = self.scorer_box.findData(scorer.source)
            if i >= 0:
                self.scorer_box.setCurrentIndex(i)
            else:
                self.scorer_box.setEditText(scorer.source)
        self.scorer_box.blockSignals(False)
        self._refresh_agreement()

    def _order_chosen(self) -> None:
        how = str(self.order_box.currentData() or "added")
        if self.state.spec is None:
            return
        st = self.state
        st.set_order(how)
        self._score_missing()
        if how in lq.NEEDS_SCORES and st.scorer is not None and not self.scoring.running:
            self._say(f"The queue is {lq.ORDERS[st.order].lower()}, by the {st.scorer.label()}.")
        self.label_view.setFocus()

    def _scorer_from_box(self) -> an.Scorer | None:
        text = self.scorer_box.currentText().strip()
        if not text:
            return None
        i = self.scorer_box.findText(text)
        rid = str(self.scorer_box.itemData(i) or "") if i >= 0 else ""
        if rid in self._scorer_runs:
            return self._scorer_runs[rid]
        current = self.state.scorer
        if current is not None and text == current.source:
            return current
        return an.scorer_for_folder(text)

    def _scorer_chosen(self) -> None:
        try:
            scorer = self._scorer_from_box()
        except ValueError as exc:
            self._say(str(exc))
            return
        if scorer == self.state.scorer:
            return
        if self.scoring.running:
            self.scoring.stop()
        self.state.set_scorer(scorer)
        self._refresh_agreement()
        self._score_missing()

    def _choose_scorer_folder(self) -> None:
        folder = self.choose_scorer_folder()
        if folder:
            self.scorer_box.setEditText(folder)
            self._scorer_chosen()

    def _score_missing(self) -> None:
        """Score the answers the chosen scorer has no reward for yet (for the order, and for the agreement line)."""
        st = self.state
        if st.scorer is None or st.spec is None or self.scoring.running:
            return
        jobs = st.to_score()
        if not jobs:
            return
        p = st.progress()
        self._done_when_scoring = p.done if p is not None else 0
        self.scoring.start(st.spec.side_a.model, st.scorer, jobs)
        self._say(f"Scoring the answers to {an.plural(len(jobs), 'prompt')} with the {st.scorer.label()}…")

    def _on_scoring_progress(self, done: int, total: int) -> None:
        if total and done < total:
            self.form.status.setText(f"Scored {done} of {an.plural(total, 'prompt')}…")

    def _on_scored(self, problem: str) -> None:
        if problem:
            self._say(problem)
            return
        st = self.state
        p = st.progress()
        # nothing decided meanwhile: start at the head of a queue ordered by the predictions
        if st.order in lq.NEEDS_SCORES and p is not None and p.done == self._done_when_scoring:
            st.first_in_queue()
        self._say(f"Every pair has its prediction: the queue is {lq.ORDERS[st.order].lower()}.")
        self.label_view.setFocus()

    # --- session --------------------------------------------------------------------
    def refresh(self) -> None:
        """Runs for the model pickers, sessions to reopen."""
        everyone = self.store.list_runs()
        runs = [r for r in everyone if is_exportable(field(r, "status") or "")]
        names = run_labels(runs, everyone)  # by name, "dpo-1 from sft-demo"; the id in the tooltip
        runs = [(field(r, "id"), names[field(r, "id")]) for r in runs]
        self.form.side_a.set_runs(runs)
        self.form.side_b.set_runs(runs)
        self._set_scorer_runs([r for r in everyone if is_exportable(field(r, "status") or "")], names)
        sessions = an.list_sessions()
        self.form.set_sessions(sessions)
        if not self.form.model.text():
            self.form.model.setText(self._model() or "default")
        if self.spec is None and sessions and not self.generator.running:
            self.open_session(sessions[0])  # the app reopened: continue the latest session where it stopped
        self._refresh_progress()

    def _set_scorer_runs(self, runs: list, names: dict[str, str]) -> None:
        """The runs that can score: reward runs (their reward model) and DPO runs (their implicit reward)."""
        self._scorer_runs = {}
        for run in runs:
            scorer = an.scorer_for_run(run)
            if scorer is not None:
                self._scorer_runs[scorer.source] = an.Scorer(
                    scorer.kind, scorer.source, scorer.reference, scorer.beta, names.get(scorer.source, scorer.name)
                )
        self.scorer_box.blockSignals(True)
        self.scorer_box.clear()
        for rid, scorer in self._scorer_runs.items():
            kind = "reward model" if scorer.kind == "reward_model" else "DPO, implicit reward"
            self.scorer_box.addItem(f"{scorer.name or rid} ({kind})", rid)
            self.scorer_box.setItemData(self.scorer_box.count() - 1, f"run {rid}", Qt.ItemDataRole.ToolTipRole)
        self.scorer_box.blockSignals(False)
        self._show_queue()

    def load_prompts_file(self, path: str) -> None:
        self._say(self.form.load_prompts_file(path))

    def _choose_prompts_file(self) -> None:
        path = self.choose_prompts_file()
        if path:
            self.load_prompts_file(path)

    def generate(self) -> None:
        if self.generator.running:
            return
        try:
            spec = self.form.spec()
        except ValueError as exc:
            self._say(str(exc))
            return
        current = self.spec
        if current is not None and current.name == spec.name:
            same = (spec.prompts, spec.side_a, spec.side_b, spec.sampling, spec.pairs_per_prompt) == (
                current.prompts,
                current.side_a,
                current.side_b,
                current.sampling,
                current.pairs_per_prompt,
            )
            if not same and current.items:
                self._say("This session has answers already: name a new session to change its models or settings.")
                return
            spec.items = current.items
        elif spec.path.exists():
            self._say(f"A session named {spec.name!r} exists: open it (Reopen) or choose another name.")
            return
        spec.save()
        self.form.set_sessions(an.list_sessions())
        self.form.set_prompts(spec.prompts, f"in session {spec.name!r}")
        fresh = not an.Predictions(spec.name).path.exists()
        order = str(self.order_box.currentData() or "added")
        try:
            scorer = self._scorer_from_box()
        except ValueError:
            scorer = None
        self.state.use(self.store.preferences, spec)
        if fresh:  # a new session: the order and scorer chosen before it existed
            self.state.set_scorer(scorer)
            self.state.set_order(order)
        self.generator.weights = self.form.weights_value()
        count = self.generator.start(spec, self.store.preferences)
        if count:
            self.form.set_generating(True)
            self._say(f"Generating answers for {an.plural(count, 'prompt')}…")
        else:
            self._say("Every prompt has its answers.")
            self.label_view.setFocus()

    def open_session(self, name: str) -> None:
        if not name or self.generator.running:
            return
        try:
            spec = an.SessionSpec.load(name)
        except ValueError as exc:
            self._say(str(exc))
            return
        self.form.show_spec(spec)
        self.scoring.stop()
        self.state.use(self.store.preferences, spec)
        missing = len(self.generator.missing_prompts(spec, self.store.preferences))
        self._say(
            f"Session {spec.name!r} reopened"
            + (f"; {an.plural(missing, 'prompt')} still need answers." if missing else ".")
        )
        self._score_missing()
        self.label_view.setFocus()

    def _annotator_changed(self, name: str) -> None:
        """The person labelling, typed at any time: the session is theirs (their decisions are theirs)."""
        self.state.set_annotator(name)
        if self.state.spec is not None:
            self.label_view.setFocus()

    # --- generation -----------------------------------------------------------------
    def _on_progress(self, done: int, total: int) -> None:
        self.form.gen_progress.setRange(0, max(1, total))
        self.form.gen_progress.setValue(done)

    def _on_stream(self, head: str, text: str) -> None:
        self.form.stream_head.setText(head)
        self.form.stream.setPlainText(text)

    def _on_generated(self, problem: str) -> None:
        self.form.set_generating(False)
        if not problem:
            assert self.spec is not None
            problem = f"All answers generated: {an.plural(len(self.spec.items), 'pair')} to label."
        self._say(problem)
        self.label_view.refresh()
        self._refresh_progress()
        self._score_missing()  # the new pairs' predictions, for an order by them
        self.label_view.setFocus()  # the keys label again, whatever was clicked to start

    # --- export and training --------------------------------------------------------
    def _pairs_cli(self, what: str, args: list[str], done) -> None:
        """``engine pairs EXPORT|IMPORT ... --json`` in the background (an :class:`EngineJob`, as every engine
        command); ``done(event)`` with its typed answer (``core.protocol.pairs_report``)."""
        if self._pairs_job.running:
            return
        self._pairs_what, self._pairs_then = what, done
        self.export_button.setEnabled(False)
        self.import_button.setEnabled(False)
        self._say(f"{what.capitalize()} of the pairs…")
        self._pairs_job.run("pairs", *args, "--json")

    def _pairs_done(self, event: object) -> None:
        self.export_button.setEnabled(True)
        self.import_button.setEnabled(True)
        if not isinstance(event, PairsImported | PairsExported):
            self._pairs_failed(f"an unexpected answer ({getattr(event, 'type', event)!r})")
            return
        self._pairs_then(event)
        self._refresh_policy()

    def _pairs_failed(self, message: str) -> None:
        self.export_button.setEnabled(True)
        self.import_button.setEnabled(True)
        self._say(f"{self._pairs_what.capitalize()} failed: {message.removeprefix('error: ')}")

    def export(self) -> None:
        out = self.choose_export_dir()
        if out:
            self._pairs_cli("export", ["export", out, "--format", self.export_format.currentText()], self._exported)

    def import_pairs(self) -> None:
        path = self.choose_import_file()
        if path:
            self._pairs_cli("import", ["import", path], self._imported)

    def _imported(self, s: PairsImported) -> None:
        self._say(
            f"Imported {s.pairs} pairs from {Path(s.file).name} ({s.format}): {s.added} new, "
            f"{s.unchanged} already in the store, {s.changed} with a changed decision."
        )

    def _exported(self, manifest: PairsExported) -> None:
        self.last_snapshot = manifest.snapshot
        self.last_export = manifest
        self._say(
            f"Exported {manifest.pairs} pairs ({manifest.format}) as snapshot {manifest.snapshot}. "
            + an.policy_text(manifest.left_out)
        )

    def train_dpo(self) -> None:
        """Set up for DPO on the store's pairs (the last export's snapshot, else the pairs as they are now), from the
        adapter that answered, at DPO's learning rate, under a run name of its own."""
        spec = self.spec
        config: dict[str, object] = {
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
        self.scoring.stop()
        if self._own_worker:
            self.worker.shutdown()
        self._pairs_job.cancel()
