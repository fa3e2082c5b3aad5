"""Choose the dataset; show the engine's verdict: format, kind, rows, the checks and a rendered example.

The example is shown with the tokens that are trained on highlighted, read from
``engine data inspect --json``; keys the engine does not (yet) send are skipped.
"""

from __future__ import annotations

import html

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from finetune_studio.studio.jobs import EngineJob
from finetune_studio.studio.setup_state import HELP, SetupState
from finetune_studio.studio.widgets.config_form import ErrorLabel

DATA_FILTER = "Datasets (*.jsonl *.json *.csv *.tsv *.parquet);;All files (*)"
TRAINED_STYLE = "background-color: rgba(60, 170, 110, 0.35);"


class DatasetPanel(QGroupBox):
    def __init__(self, state: SetupState, parent: QWidget | None = None):
        super().__init__("Dataset", parent)
        self.state = state
        self.job = EngineJob(self)
        self.job.done.connect(
            lambda info: state.set_dataset_info(
                info if isinstance(info, dict) else None,
                "" if isinstance(info, dict) else "The engine's answer was not understood.",
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
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(file_btn)
        row.addWidget(folder_btn)
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
        args = ["data", "inspect", path, "--json"]
        model = str(self.state.values["model"]).strip()
        if model:
            args += ["--model", model]
        if str(self.state.values["max_length"]).strip().isdigit():
            args += ["--max-length", str(self.state.values["max_length"]).strip()]
        if self.state.values.get("trust_remote_code") is True:
            args.append("--trust-remote-code")
        self.state.set_dataset_info(None, "Checking the dataset…", pending=True)
        self.job.run(*args)

    def _show(self) -> None:
        st = self.state
        self.error.show_error(st.errors.get("dataset", "") if st.values["dataset"] else "")
        info = st.dataset_info
        self.problems.clear()
        if info is None:
            self.summary.setText(st.dataset_message if st.values["dataset"] and not st.errors.get("dataset") else "–")
            self.preview.clear()
            return
        bits = [str(info.get(k)) for k in ("format", "kind") if info.get(k)]
        if info.get("rows") is not None:
            bits.append(f"{info['rows']:,} rows" if isinstance(info["rows"], int) else f"{info['rows']} rows")
        self.summary.setText(" · ".join(bits + stats_lines(info.get("stats"))) or "–")
        problems = info.get("problems") or []
        for p in problems[:200]:
            if isinstance(p, dict):
                where = f"line {p['line']}: " if p.get("line") else ""
                self.problems.addItem(where + str(p.get("message", "")))
            else:
                self.problems.addItem(str(p))
        if not problems:
            self.problems.addItem("No problems found.")
        example = next((info[k] for k in ("example", "rendered", "preview", "examples") if info.get(k)), None)
        self.preview.setHtml(render_example(example))


def stats_lines(stats) -> list[str]:
    """The few statistics worth a glance: token lengths, trained tokens, truncation."""
    if not isinstance(stats, dict):
        return []
    out = []
    tokens = stats.get("tokens") if isinstance(stats.get("tokens"), dict) else {}
    lengths, trained = tokens.get("lengths") or {}, tokens.get("trained") or {}
    if lengths.get("median") is not None:
        out.append(f"tokens: median {_fmt(lengths['median'])}, max {_fmt(lengths.get('max', 0))}")
    if trained.get("median") is not None:
        out.append(f"trained tokens: median {_fmt(trained['median'])}")
    for key, text in (("over_max_length", "over max length"), ("no_trained_tokens", "with nothing to train")):
        if tokens.get(key):
            out.append(f"{tokens[key]:,} {text}")
    out += [
        f"{k.replace('_', ' ')}: {_fmt(v)}"
        for k, v in stats.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ][:4]
    return out


def _fmt(v) -> str:
    return f"{v:,.1f}".rstrip("0").rstrip(".") if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v


def render_example(example) -> str:
    """HTML for the engine's rendered example, trained spans highlighted; tolerant of its exact shape."""
    if example is None:
        return "<i>No rendered example.</i>"
    if isinstance(example, str):
        return _pre(html.escape(example))
    if isinstance(example, list):
        if example and all(isinstance(s, dict) and "text" in s for s in example):
            return _pre("".join(_segment(s) for s in example))
        return "<hr>".join(render_example(e) for e in example[:3])
    if isinstance(example, dict):
        if "segments" in example:
            return render_example(example["segments"])
        if "text" in example and isinstance(example.get("trained_spans") or example.get("spans"), list):
            text, out, pos = example["text"], [], 0
            for start, end in sorted(example.get("trained_spans") or example["spans"]):
                out.append(html.escape(text[pos:start]))
                out.append(f"<span style='{TRAINED_STYLE}'>{html.escape(text[start:end])}</span>")
                pos = end
            out.append(html.escape(text[pos:]))
            return _pre("".join(out))
        parts = [
            f"<b>{html.escape(str(k))}</b>{render_example(v)}"
            for k, v in example.items()
            if k in ("prompt", "chosen", "rejected", "text", "completion")
        ]
        if parts:
            return "".join(parts)
        return _pre(html.escape(str(example)))
    return _pre(html.escape(str(example)))


def _segment(seg: dict) -> str:
    text = html.escape(str(seg.get("text", "")))
    trained = seg.get("trained", seg.get("train", seg.get("label", False)))
    return f"<span style='{TRAINED_STYLE}'>{text}</span>" if trained else text


def _pre(body: str) -> str:
    return f"<pre style='white-space: pre-wrap; font-family: monospace;'>{body}</pre>"
