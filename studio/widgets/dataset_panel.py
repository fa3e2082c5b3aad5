"""Choose the dataset (or one of the bundled demo sets); show the engine's verdict: format, kind, rows, the
checks and a rendered example.

The verdict is the :class:`core.protocol.dataset_report.DatasetReport` that ``engine data inspect --json`` sends; the
example is shown with the tokens that are trained on highlighted.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QMenu,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.core.paths import resources_dir
from finetune_studio.core.protocol.dataset_report import DatasetReport, ExamplePreview, RenderedSequence, Segment
from finetune_studio.studio.services.jobs import EngineJob
from finetune_studio.studio.state.setup import HELP, SetupState
from finetune_studio.studio.widgets.config_form import ErrorLabel

DATA_FILTER = "Datasets (*.jsonl *.json *.csv *.tsv *.parquet);;All files (*)"
TRAINED_STYLE = "background-color: rgba(60, 170, 110, 0.35);"


@dataclass(frozen=True)
class Demo:
    name: str
    label: str
    file: str
    objective: str  # the objective this data is made for
    help: str

    @property
    def path(self) -> Path:
        return resources_dir() / "datasets" / self.file


DEMOS = (
    Demo(
        "sft",
        "Demo: JSON extraction (SFT)",
        "demo_sft.jsonl",
        "sft",
        "400 chat examples: turn a sentence about a person into a JSON object; trains with SFT",
    ),
    Demo(
        "preference",
        "Demo: JSON extraction preferences (DPO)",
        "demo_preference.jsonl",
        "dpo",
        "400 prompt / chosen / rejected pairs for the same task; trains with DPO",
    ),
)


class DatasetPanel(QGroupBox):
    def __init__(self, state: SetupState, parent: QWidget | None = None):
        super().__init__("Dataset", parent)
        self.state = state
        self.job = EngineJob(self)
        self.job.done.connect(
            lambda report: state.set_dataset_info(
                report if isinstance(report, DatasetReport) else None,
                "" if isinstance(report, DatasetReport) else "The engine did not report on the dataset.",
            )
        )
        self.job.failed.connect(lambda msg: state.set_dataset_info(None, msg))
        self.path = QLineEdit(self)
        self.path.setObjectName("datasetPath")
        self.path.setPlaceholderText("a .jsonl, .json, .csv, .tsv or .parquet file, or a datasets folder")
        self.path.setToolTip(HELP["dataset"]["help"])
        self.path.setText(str(state.values["dataset"]))
        self.path.editingFinished.connect(lambda: state.set("dataset", self.path.text().strip()))
        file_btn = QPushButton("File…", self)
        file_btn.clicked.connect(self._pick_file)
        folder_btn = QPushButton("Folder…", self)
        folder_btn.clicked.connect(self._pick_folder)
        self.demo_button = QPushButton("Use demo data", self)
        self.demo_button.setObjectName("demoDataButton")
        self.demo_button.setToolTip("The bundled demo datasets: one click sets the data and the objective to match")
        menu = QMenu(self.demo_button)
        self.demo_actions: dict[str, QAction] = {}
        for demo in DEMOS:
            action = menu.addAction(demo.label)
            action.setToolTip(demo.help)
            action.triggered.connect(lambda _checked=False, d=demo: self.use_demo(d.name))
            self.demo_actions[demo.name] = action
        self.demo_button.setMenu(menu)
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(file_btn)
        row.addWidget(folder_btn)
        row.addWidget(self.demo_button)
        self.error = ErrorLabel(self)
        self.summary = QLabel("–", self)
        self.summary.setObjectName("datasetSummary")
        self.summary.setWordWrap(True)
        self.problems = QListWidget(self)
        self.problems.setObjectName("datasetProblems")
        self.problems.setMaximumHeight(90)
        self.preview = QTextBrowser(self)
        self.preview.setObjectName("datasetPreview")
        self.preview.setMinimumHeight(140)
        self.preview.setToolTip("The first example as the model sees it; highlighted tokens are trained on.")
        facts = QFormLayout()
        facts.addRow("Detected", self.summary)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.error)
        lay.addLayout(facts)
        lay.addWidget(QLabel("Checks", self))
        lay.addWidget(self.problems)
        lay.addWidget(QLabel("Rendered example (highlighted: trained tokens)", self))
        lay.addWidget(self.preview, 1)
        self._debounce = QTimer(self, singleShot=True, interval=400)
        self._debounce.timeout.connect(self.inspect)
        state.subscribe(self._on_state)
        self._show()

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training data", "", DATA_FILTER)
        if path:
            self.choose(path)

    def _pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if path:
            self.choose(path)

    def choose(self, path: str) -> None:
        self.path.setText(path)
        self.state.set("dataset", path)

    def use_demo(self, name: str) -> None:
        """Point at a bundled demo dataset and choose the objective it is made for."""
        demo = next(d for d in DEMOS if d.name == name)
        if str(self.state.values["dataset"]).strip() != str(demo.path):
            self.state.set_dataset_info(None, "Checking the dataset…", pending=True)  # the old report is stale
        self.state.set("objective", demo.objective)
        self.state.set("dataset_mapping", "")  # the demo files use standard column names
        self.choose(str(demo.path))

    def _on_state(self, topic: str) -> None:
        if topic in ("values:dataset", "values:model", "values:max_length", "values:*", "values:dataset_mapping"):
            if self.path.text() != self.state.values["dataset"]:
                self.path.setText(str(self.state.values["dataset"]))
            self._debounce.start()
        elif topic in ("dataset", "errors"):
            self._show()

    def inspect(self) -> None:
        path = str(self.state.values["dataset"]).strip()
        if not path:
            self.job.cancel()
            self.state.set_dataset_info(None)
            return
        args = ["data", "inspect", "--json"]
        model = str(self.state.values["model"]).strip()
        if model:
            args.append(f"--model={model}")  # one argument: a model path starting with '-' is still the value
        if str(self.state.values["max_length"]).strip().isdigit():
            args += ["--max-length", str(self.state.values["max_length"]).strip()]
        if self.state.values.get("trust_remote_code") is True:
            args.append("--trust-remote-code")
        args += ["--", path]  # the path last, after '--': a file named '-h' is a file, not an option
        self.state.set_dataset_info(None, "Checking the dataset…", pending=True)
        self.job.run(*args)

    def _show(self) -> None:
        st = self.state
        self.error.show_error(st.errors.get("dataset", "") if st.values["dataset"] else "")
        invalid = bool(st.errors.get("dataset"))  # marked in red, as the memory panel and Start's note say
        if bool(self.path.property("invalid")) != invalid:
            self.path.setProperty("invalid", invalid)
            self.path.style().unpolish(self.path)
            self.path.style().polish(self.path)
        report = st.dataset_info
        self.problems.clear()
        if report is None:
            self.summary.setText(st.dataset_message if st.values["dataset"] and not st.errors.get("dataset") else "–")
            self.preview.clear()
            return
        self.summary.setText(" · ".join(summary_bits(report)))
        for p in report.problems[:200]:
            self.problems.addItem(p.where + p.message)
        if not report.problems:
            self.problems.addItem("No problems found.")
        self.preview.setHtml(render_example(report.example))


def summary_bits(report: DatasetReport) -> list[str]:
    """Format, kind and rows, then the few statistics worth a glance: token lengths, trained tokens, truncation."""
    rows = f"{report.rows:,} rows"
    if report.rows_read > report.rows:
        rows += f" (of {report.rows_read:,} read)"
    out = [report.format, report.kind, rows]
    tokens = report.tokens
    if tokens is not None:
        if tokens.lengths is not None:
            out.append(f"tokens: median {_fmt(tokens.lengths.median)}, max {_fmt(tokens.lengths.max)}")
        if tokens.trained is not None:
            out.append(f"trained tokens: median {_fmt(tokens.trained.median)}")
        if tokens.over_max_length:
            out.append(f"{tokens.over_max_length:,} over max length {tokens.max_length:,}")
        if tokens.no_trained_tokens:
            out.append(f"{tokens.no_trained_tokens:,} with nothing to train")
    bias = report.length_bias
    if bias is not None:
        out.append(f"chosen longer in {bias.chosen_longer_share:.0%} of pairs")
    return out


def _fmt(v: float) -> str:
    return f"{v:,.1f}".rstrip("0").rstrip(".") if isinstance(v, float) else f"{v:,}"


def render_example(example: ExamplePreview | None) -> str:
    """HTML for the engine's rendered example, trained spans highlighted; the raw row without a tokenizer."""
    if example is None:
        return "<i>No rendered example.</i>"
    if example.sequence is not None:
        return _sequence(example.sequence)
    if example.chosen is not None and example.rejected is not None:
        return f"<b>chosen</b>{_sequence(example.chosen)}<b>rejected</b>{_sequence(example.rejected)}"
    note = "<i>Not rendered (no tokenizer for this model); the row as read:</i>"
    return note + _pre(html.escape(json.dumps(example.data, ensure_ascii=False, indent=2)))


def _sequence(seq: RenderedSequence) -> str:
    return _pre("".join(_segment(s) for s in seq.segments))


def _segment(seg: Segment) -> str:
    text = html.escape(seg.text)
    return f"<span style='{TRAINED_STYLE}'>{text}</span>" if seg.trained else text


def _pre(body: str) -> str:
    return f"<pre style='white-space: pre-wrap; font-family: monospace;'>{body}</pre>"
