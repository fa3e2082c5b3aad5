"""The set-up page: generated form, per-field errors before Start, presets, method × objective, memory panel."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QLineEdit
from studio_support import IGNORE_OFFSCREEN, fake_engine, write_sft_jsonl

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.protocol.dataset_report import DatasetReport
from finetune_studio.engine.cli import data as data_cli
from finetune_studio.studio.state.presets import load_presets, presets_dir, read_preset
from finetune_studio.studio.state.setup import HELP, SetupState
from finetune_studio.studio.widgets.dataset_panel import DEMOS

pytestmark = IGNORE_OFFSCREEN


def engine_report(data: str, model) -> str:
    """The engine's ``data inspect --json`` answer for ``data`` (its own code, run here): the line the studio gets."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert data_cli.main(["inspect", data, "--json", "--model", str(model)]) == 0
    return out.getvalue().strip()


def replay(answers: dict[str, str]):
    """An engine command that answers ``data inspect PATH`` with the engine's recorded line for PATH."""

    def argv(*args: str) -> list[str]:
        assert args[:2] == ("data", "inspect") and "--json" in args, args
        return [sys.executable, "-P", "-c", f"print({answers[args[-1]]!r})"]  # the path comes last, after '--'

    return argv


@pytest.fixture(scope="module")
def sft_data_and_report(tmp_path_factory, tiny_model_dir) -> tuple[str, str]:
    """24 usable chat rows and one without an answer, with the engine's report on them."""
    data = write_sft_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")
    with open(data, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "Anyone there?"}]}) + "\n")
    return data, engine_report(data, tiny_model_dir)


def test_every_preset_validates():
    files = sorted(p for p in presets_dir().iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 4
    for path in files:
        preset = read_preset(path)
        assert preset.description, path.name
        TrainConfig.from_dict(preset.config)  # raises ConfigError naming the field
    assert len(load_presets()) == len(files)


def test_state_names_each_bad_field():
    st = SetupState({"dataset": "data.jsonl"})
    assert st.ready and st.errors == {}
    st.set("learning_rate", "abc")
    st.set("batch_size", "0")
    assert set(st.errors) == {"learning_rate", "batch_size"}
    assert "number" in st.errors["learning_rate"] and "whole number from 1" in st.errors["batch_size"]
    assert not st.ready and st.config is None
    st.set("learning_rate", "1e-4")
    st.set("batch_size", "8")
    assert st.ready and st.config.learning_rate == 1e-4 and st.config.batch_size == 8


def test_dpo_on_sft_data_is_explained_next_to_objective():
    st = SetupState({"dataset": "d.jsonl", "objective": "dpo"})
    st.set_dataset_info(DatasetReport(file="d.jsonl", format="messages", kind="sft", rows=3))
    assert "DPO needs preference data" in st.errors["objective"]
    st.set("objective", "sft")
    assert "objective" not in st.errors


@pytest.fixture
def window(make_window, tiny_model_dir, sft_data_and_report):
    data, report = sft_data_and_report
    win = make_window({"model": str(tiny_model_dir), "dataset": "", "max_steps": 5})
    win.setup_page.dataset_panel.job.command = replay({data: report})
    win.show()
    return win, data


def test_click_through_setup(qtbot, window, tiny_model_dir):
    win, data = window
    page, st = win.setup_page, win.setup_state
    assert "Finetune Studio" in win.windowTitle()
    # The model panel reads the local folder's shape at once.
    qtbot.waitUntil(lambda: st.model_info is not None, timeout=5000)
    assert page.model_panel.facts["layers"].text() == "2"
    assert page.model_panel.facts["hidden_size"].text() == "64"
    assert page.model_panel.facts["parameters"].text() not in ("", "–")
    # No dataset yet: Start is disabled and the reason is shown.
    assert not page.start_button.isEnabled()
    assert "dataset" in page.blockers.text()
    # Choose the dataset: the engine's report (replayed) fills the panel.
    page.dataset_panel.path.setText(data)
    page.dataset_panel.path.editingFinished.emit()
    qtbot.waitUntil(lambda: st.dataset_info is not None, timeout=15_000)
    panel, report = page.dataset_panel, st.dataset_info
    assert isinstance(report, DatasetReport) and (report.kind, report.rows, report.rows_read) == ("sft", 24, 25)
    summary = panel.summary.text()
    assert summary.startswith("messages · sft · 24 rows (of 25 read)")
    assert f"tokens: median {report.tokens.lengths.median:g}" in summary
    dropped = next(p for p in report.problems if p.line == 25)
    assert panel.problems.item(0).text() == f"line 25: {dropped.message}"
    assert panel.problems.count() == len(report.problems)
    trained = [s.text for s in report.example.sequence.segments if s.trained]
    assert trained and "0 plus 0 is 0." in trained[0]
    html = panel.preview.toHtml()
    assert "background-color" in html and "0 plus 0 is 0." in panel.preview.toPlainText()
    assert panel.preview.toPlainText().strip() == report.example.sequence.text.strip()
    # Method × objective buttons.
    qtbot.mouseClick(page.method.buttons["dora"], Qt.MouseButton.LeftButton)
    assert st.values["method"] == "dora" and page.method.buttons["dora"].isChecked()
    qtbot.mouseClick(page.objective.buttons["dpo"], Qt.MouseButton.LeftButton)
    assert "DPO needs preference data" in page.objective_error.text() and page.objective_error.isVisible()
    assert not page.start_button.isEnabled()
    qtbot.mouseClick(page.objective.buttons["sft"], Qt.MouseButton.LeftButton)
    # A bad value is explained next to its field; fixing it enables Start.
    lr = page.basic_form.editors["learning_rate"]
    assert isinstance(lr, QLineEdit) and lr.toolTip() == HELP["learning_rate"]["help"]
    lr.selectAll()
    qtbot.keyClicks(lr, "fast")
    assert page.basic_form.errors["learning_rate"].isVisible()
    assert "number" in page.basic_form.errors["learning_rate"].text()
    assert not page.start_button.isEnabled()
    lr.selectAll()
    qtbot.keyClicks(lr, "3e-4")
    assert not page.basic_form.errors["learning_rate"].isVisible()
    assert page.start_button.isEnabled(), page.blockers.text()
    # Advanced fields are hidden until asked for; they are generated too, with tooltips.
    assert not page.advanced_form.isVisible()
    qtbot.mouseClick(page.advanced_toggle, Qt.MouseButton.LeftButton)
    assert page.advanced_form.isVisible()
    gc = page.advanced_form.editors["gradient_checkpointing"]
    assert isinstance(gc, QCheckBox) and gc.toolTip() == HELP["gradient_checkpointing"]["help"]
    gc.click()
    assert st.config.gradient_checkpointing is True
    # A preset fills the form.
    quick = next(i for i, p in enumerate(page.presets) if p.config.get("objective") == "sft") + 1
    page.preset_box.activated.emit(quick)
    preset = page.presets[quick - 1]
    assert page.basic_form.editors["max_steps"].text() == str(preset.config["max_steps"])
    # Start hands a validated TrainConfig over.
    with qtbot.waitSignal(page.start_requested, timeout=1000) as got:
        page.start_requested.disconnect(win.start_run)
        page.request_start()
    cfg = got.args[0]
    assert isinstance(cfg, TrainConfig) and cfg.method == preset.config["method"] and cfg.dataset == data
    assert cfg.gradient_checkpointing is True  # kept: the preset does not name it
    assert cfg.model == str(tiny_model_dir) and cfg.learning_rate == preset.config["learning_rate"]


def test_memory_budget_follows_every_change(qtbot, window):
    win, data = window
    page, st = win.setup_page, win.setup_state
    st.set("dataset", data)
    qtbot.waitUntil(lambda: page.device is not None and win.setup_memory.estimate.total_bytes > 0, timeout=10_000)
    est = win.setup_memory.estimate
    assert est.device_total_bytes > 0 and "Needs" in page.memory_panel.summary.text()
    assert {"base weights", "activations", "optimizer"} <= set(est.parts)
    before = est.total_bytes
    st.set("batch_size", "64")
    qtbot.waitUntil(lambda: win.setup_memory.estimate.total_bytes > before, timeout=5000)
    st.set("batch_size", "zero")  # invalid: the panel says why there is no estimate
    qtbot.waitUntil(lambda: win.setup_memory.estimate.total_bytes == 0, timeout=5000)
    assert "settings marked in red" in page.memory_panel.summary.text()


def test_choices_are_remembered(qtbot, make_window, tiny_model_dir):
    win = make_window({"model": str(tiny_model_dir), "dataset": "x.jsonl"})
    win.setup_state.set("lora_rank", "32")
    win.setup_state.set("method", "qlora")
    win.close()
    again = make_window()
    assert again.setup_state.values["lora_rank"] == "32"
    assert again.setup_state.values["method"] == "qlora"
    assert again.setup_state.values["model"] == str(tiny_model_dir)


def test_gguf_model_is_imported_by_the_engine_with_progress(qtbot, make_window, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    win = make_window({"model": str(gguf), "dataset": ""})
    panel = win.setup_page.model_panel
    panel.job.command = fake_engine("""
        for i in range(5):
            emit(type="progress", stage="convert", done=i, total=4, message=f"Converting ({i}/4)")
            time.sleep(0.2)
        emit(type="model", name="model", path="/tmp/converted", architecture="LlamaForCausalLM",
             parameters=134515008, layers=30, hidden_size=576, vocab_size=49152, context_length=8192,
             dtype="bfloat16")
    """)
    seen = []  # what the bar shows as each progress event arrives (the panel's own slot runs first)
    panel.job.progress.connect(
        lambda ev: seen.append((ev.done, panel.progress.isVisible(), panel.progress.value(), panel.progress.format()))
    )
    win.show()
    with qtbot.waitSignal(panel.job.done, timeout=20_000):
        panel.resolve()
        assert "GGUF" in win.setup_state.model_message
    assert seen == [(i, True, i, f"Converting ({i}/4)") for i in range(5)]
    assert panel.facts["parameters"].text() == "134.5M" and panel.facts["context_length"].text() == "8,192"
    assert not panel.progress.isVisible()
    # A failure from the engine is shown next to the model, in its words.
    panel.job.command = fake_engine("emit(type='failed', kind='model', message='Model problem: cannot read x.gguf')")
    with qtbot.waitSignal(panel.job.failed, timeout=20_000):
        panel.resolve()
    assert "cannot read x.gguf" in panel.message.text() and panel.message.isVisible()


def test_demo_data_in_one_click_with_the_matching_objective(qtbot, make_window, tiny_model_dir):
    win = make_window(
        {"model": str(tiny_model_dir), "dataset": "", "objective": "dpo", "dataset_mapping": {"prompt": "q"}}
    )
    win.show()
    page, st = win.setup_page, win.setup_state
    panel = page.dataset_panel
    demos = {d.name: str(d.path) for d in DEMOS}
    panel.job.command = replay({path: engine_report(path, tiny_model_dir) for path in demos.values()})
    menu = panel.demo_button.menu()
    assert [a.text() for a in menu.actions()] == [
        "Demo: JSON extraction (SFT)",
        "Demo: JSON extraction preferences (DPO)",
    ]
    # SFT demo: the data, the objective and the engine's report on the bundled file all agree.
    panel.demo_actions["sft"].trigger()
    assert st.values["objective"] == "sft" and page.objective.buttons["sft"].isChecked()
    assert st.values["dataset_mapping"] == ""  # a mapping meant for other data is dropped
    assert panel.path.text() == st.values["dataset"] == demos["sft"] and demos["sft"].endswith("demo_sft.jsonl")
    qtbot.waitUntil(lambda: st.dataset_info is not None, timeout=20_000)
    assert (st.dataset_info.kind, st.dataset_info.rows) == ("sft", 400)
    assert "objective" not in st.errors and "dataset" not in st.errors
    assert page.start_button.isEnabled(), page.blockers.text()
    # Preference demo: DPO, and no "DPO needs preference data".
    panel.demo_actions["preference"].trigger()
    assert st.values["objective"] == "dpo" and page.objective.buttons["dpo"].isChecked()
    assert panel.path.text() == demos["preference"] and demos["preference"].endswith("demo_preference.jsonl")
    assert "objective" not in st.errors  # the SFT report is gone at once, so no stale "DPO needs preference data"
    qtbot.waitUntil(lambda: st.dataset_info is not None, timeout=20_000)
    assert (st.dataset_info.kind, st.dataset_info.rows) == ("preference", 400)
    assert "objective" not in st.errors and page.start_button.isEnabled(), page.blockers.text()
    assert "chosen" in panel.preview.toPlainText()


def test_pairs_of_the_store_are_a_dataset_set_up_can_start_on(qtbot, make_window, tiny_model_dir):
    """``pairs:latest`` and ``pairs:<snapshot>`` (what Annotate's *Train DPO on these pairs* sets) are checked by the
    real ``data inspect``: the pair count, DPO, and Start enabled; SFT on them is explained next to the dataset."""
    from finetune_studio.core.store import Store

    store = Store()
    rows = [{"prompt": f"Q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(3)]
    store.preferences.import_pairs(rows)
    snapshot = store.preferences.snapshot().id
    store.preferences.import_pairs([{"prompt": "Q9", "chosen": "good 9", "rejected": "bad 9"}])
    store.close()
    win = make_window({"model": str(tiny_model_dir), "dataset": "pairs:latest", "objective": "dpo", "max_steps": 2})
    win.show()
    st, page = win.setup_state, win.setup_page
    qtbot.waitUntil(
        lambda: st.dataset_info is not None or bool(st.dataset_message and not st.dataset_pending), timeout=60_000
    )
    assert st.dataset_info is not None, st.dataset_message
    assert (st.dataset_info.format, st.dataset_info.kind, st.dataset_info.rows) == ("pairs", "preference", 4)
    assert "4 rows" in page.dataset_panel.summary.text()
    qtbot.waitUntil(lambda: page.start_button.isEnabled(), timeout=30_000)
    st.set("dataset", f"pairs:{snapshot}")  # an export's snapshot: the pairs as they were then
    qtbot.waitUntil(lambda: st.dataset_info is not None and st.dataset_info.rows == 3, timeout=60_000)
    assert page.start_button.isEnabled(), page.blockers.text()
    st.set("objective", "sft")
    assert "DPO" in st.errors["dataset"] and not page.start_button.isEnabled()
    st.set("objective", "dpo")
    st.set("dataset", "pairs:pairs-000000000000")
    qtbot.waitUntil(lambda: not st.dataset_pending and "dataset" in st.errors, timeout=60_000)
    assert "no pairs snapshot" in st.errors["dataset"] and not page.start_button.isEnabled()
