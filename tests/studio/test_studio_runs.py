"""The runs page: every run from the database, filter, sort, overlay, open, start again, export."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import Qt
from studio_support import IGNORE_OFFSCREEN, fake_engine

from finetune_studio.core.store import Store

pytestmark = IGNORE_OFFSCREEN


def seed(store: Store) -> list[str]:
    ids = []
    specs = [
        ("alpha", "completed", "lora", "sft", 0.8),
        ("beta", "stopped", "qlora", "sft", 1.1),
        ("gamma", "failed", "dora", "dpo", None),
    ]
    for i, (name, status, method, objective, final) in enumerate(specs):
        cfg = {
            "model": f"/models/m{i}",
            "dataset": f"/data/{name}.jsonl",
            "method": method,
            "objective": objective,
            "max_steps": 30,
            "run_name": name,
            "learning_rate": 1e-4 * (i + 1),
        }
        run_id = store.create_run(cfg, run_id=f"2026-{i}", name=name)
        store.update_run(
            run_id,
            status=status,
            started_at=1000.0 + i,
            finished_at=1000.0 + i + 60 * (i + 1),
            final_loss=final,
            step=20 + i,
            total_steps=30,
            error="Out of memory: lower batch_size" if status == "failed" else None,
            error_kind="oom",
        )
        for s in range(1, 21 + i):
            store.add_metrics(run_id, "train", s, {"loss": 3.0 / s + i, "lr": 1e-4})
        store.add_metrics(run_id, "eval", 20, {"eval_loss": 1.0 + i})
        ids.append(run_id)
    return ids


@pytest.fixture
def window(qtbot, make_window, tiny_model_dir):
    ids = seed(Store())
    win = make_window({"model": str(tiny_model_dir), "dataset": ""})
    win.show()
    win.tabs.setCurrentWidget(win.runs_page)
    return win, ids


def visible_names(page) -> list[str]:
    return [page.proxy.index(r, 0).data() for r in range(page.proxy.rowCount())]


def test_runs_are_listed_filtered_and_sorted(window):
    win, ids = window
    page = win.runs_page
    assert sorted(visible_names(page)) == ["alpha", "beta", "gamma"]
    row = {page.proxy.index(r, 0).data(): r for r in range(page.proxy.rowCount())}["beta"]
    cells = [page.proxy.index(row, c).data() for c in range(page.proxy.columnCount())]
    assert cells[1:7] == ["stopped", "m1", "beta.jsonl", "QLoRA", "SFT", "21 / 30"] and cells[7] == "2:00"
    assert cells[8] == "1.1000"
    page.filter_edit.setText("dpo")
    assert visible_names(page) == ["gamma"]
    page.filter_edit.setText("")
    page.status_box.setCurrentIndex(page.status_box.findData("completed"))
    assert visible_names(page) == ["alpha"]
    page.status_box.setCurrentIndex(0)
    page.table.sortByColumn(7, pytest.importorskip("PySide6.QtCore").Qt.SortOrder.DescendingOrder)  # duration
    assert visible_names(page) == ["gamma", "beta", "alpha"]
    status_cell = page.proxy.index(0, 1)
    assert "Out of memory" in status_cell.data(pytest.importorskip("PySide6.QtCore").Qt.ItemDataRole.ToolTipRole)


def test_overlay_open_and_new_from_config(qtbot, window):
    win, ids = window
    page = win.runs_page
    page.select_ids(ids[:2])
    assert set(page.overlay.curves) == set(ids[:2])
    assert len(page.overlay.curves[ids[1]].getOriginalDataset()[0]) == 21
    assert not page.open_button.isEnabled()  # open needs exactly one run
    page.select_ids([ids[0]])
    assert json.loads(page.config_view.toPlainText())["run_name"] == "alpha"
    assert page.export_button.isEnabled() and not page.resume_button.isEnabled()
    page.open_button.click()
    st = win.run_state
    assert win.tabs.currentWidget() is win.train_page
    assert st.info.run_id == ids[0] and st.status == "completed" and st.train.n == 20 and st.eval.n == 1
    assert "alpha" in win.train_page.config_view.toPlainText()
    win.tabs.setCurrentWidget(page)
    page.select_ids([ids[2]])
    page.open_button.click()
    assert st.status == "failed" and "Out of memory" in win.train_page.message.text()
    win.tabs.setCurrentWidget(page)
    page.select_ids([ids[1]])
    assert page.resume_button.isEnabled()
    page.again_button.click()
    assert win.tabs.currentWidget() is win.setup_page
    assert win.setup_state.values["method"] == "qlora" and win.setup_state.values["learning_rate"] == "0.0002"


def recording(fake, calls: list):
    """A fake engine that also records the engine arguments the app asked for."""
    return lambda *args: (calls.append(list(args)), fake(*args))[1]


def test_one_click_export_shows_progress_verdict_path_and_open_folder(qtbot, window, tmp_path):
    win, ids = window
    dialog = win.export_dialog
    calls: list = []
    win.export_job.command = recording(
        fake_engine(
            f"""
        emit(type="progress", stage="export", done=1, total=3, message="Copying the adapter")
        emit(type="export", run_id="2026-0", path={str(tmp_path)!r}, passed=True, checkpoint="final",
             verdict="passed - adapter: same answer", formats=["adapter"], sample="4.")
        """
        ),
        calls,
    )
    win.runs_page.select_ids([ids[0]])
    said: list[str] = []
    win.statusBar().messageChanged.connect(said.append)
    with qtbot.waitSignal(win.export_job.done, timeout=20_000):
        win.runs_page.export_button.click()
    name = win.controller.store.get_run(ids[0]).name
    assert name and name != ids[0] and f"Exporting {name}…" in said  # the run by its name, not its id
    assert dialog.isVisible() and "passed - adapter: same answer" in dialog.verdict.text()
    assert dialog.path.text() == str(tmp_path) and dialog.open_button.isVisible()
    assert "Exported and checked" in win.statusBar().currentMessage() and calls[-1] == ["export", "2026-0"]

    # A failed check: the files are there, the verdict says FAILED.
    win.export_job.command = fake_engine(
        f"""emit(type="export", run_id="2026-0", path={str(tmp_path)!r}, passed=False,
        verdict="FAILED - gguf-q8_0: <|im_end|> is not among its stop tokens"); sys.exit(3)"""
    )
    with qtbot.waitSignal(win.export_job.done, timeout=20_000):
        win.runs_page.export_button.click()
    assert "FAILED" in dialog.stage.text() and "stop tokens" in dialog.verdict.text()

    # A previous export in the default place: the dialog offers to replace it, which adds --force.
    win.export_job.command = recording(
        fake_engine(
            "emit(type='failed', kind='config', message='x is not empty: it holds a previous export'); sys.exit(1)"
        ),
        calls,
    )
    with qtbot.waitSignal(win.export_job.failed, timeout=20_000):
        win.runs_page.export_button.click()
    assert dialog.replace_button.isVisible() and not dialog.open_button.isVisible()
    with qtbot.waitSignal(win.export_job.failed, timeout=20_000):
        dialog.replace_button.click()
    assert calls[-1] == ["export", "2026-0", "--force"]
    win.export_job.command = fake_engine("sys.stderr.write('error: run 2026-0 has no adapter yet\\n'); sys.exit(1)")
    with qtbot.waitSignal(win.export_job.failed, timeout=20_000):
        win.runs_page.export_button.click()
    assert "no adapter yet" in dialog.verdict.text()


def test_export_cancel_asks_the_engine_to_clean_up(qtbot, window, tmp_path):
    win, ids = window
    cleaned = tmp_path / "cleaned"
    win.export_job.command = fake_engine(
        f"""
        import signal, time
        def bye(*_):
            open({str(cleaned)!r}, "w").write("removed the temporary folder")
            sys.exit(130)
        signal.signal(signal.SIGTERM, bye)
        emit(type="progress", stage="export", done=0, total=4, message="Merging")
        time.sleep(30)
        """
    )
    win.runs_page.select_ids([ids[0]])
    with qtbot.waitSignal(win.export_job.progress, timeout=20_000):
        win.runs_page.export_button.click()
    assert win.export_dialog.cancel_button.isVisible()
    win.export_dialog.cancel_button.click()
    qtbot.waitUntil(cleaned.is_file, timeout=10_000)
    assert "Cancelled" in win.export_dialog.stage.text() and not win.export_job.running


def test_export_as_passes_place_checkpoint_and_formats(qtbot, window, tmp_path):
    from finetune_studio.studio.widgets.export_dialog import ExportOptions

    win, ids = window
    calls: list = []
    win.choose_export_options = lambda run_id: ExportOptions(
        out=str(tmp_path / "out"), checkpoint="best", formats=("adapter", "gguf", "ollama"), quants=("f16", "q8_0")
    )
    win.export_job.command = recording(fake_engine("sys.exit(1)"), calls)
    win.runs_page.select_ids([ids[0]])
    with qtbot.waitSignal(win.export_job.failed, timeout=20_000):
        win.runs_page.export_as_button.click()
    assert calls == [
        ["export", "2026-0", str(tmp_path / "out"), "--format", "gguf", "--format", "ollama",
         "--quant", "f16,q8_0", "--checkpoint", "best"]
    ]  # fmt: skip


def test_export_as_dialog_offers_the_runs_checkpoints_and_builds_the_options(qtbot, tmp_path):
    from finetune_studio.studio.widgets.export_dialog import ExportOptionsDialog

    for step in (50, 100):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    dialog = ExportOptionsDialog("2026-0", str(tmp_path))
    qtbot.addWidget(dialog)
    choices = [dialog.checkpoint.itemData(i) for i in range(dialog.checkpoint.count())]
    assert choices == ["", "best", "50", "100"]
    assert dialog.options().args("2026-0") == ["export", "2026-0"]
    dialog.place.setText(str(tmp_path / "out"))
    dialog.checkpoint.setCurrentIndex(3)
    dialog.merged.setChecked(True)
    dialog.ollama.setChecked(True)
    dialog.quants["f16"].setChecked(True)
    assert dialog.options().args("2026-0") == [
        "export", "2026-0", str(tmp_path / "out"), "--format", "merged", "--format", "ollama",
        "--quant", "f16,q8_0", "--checkpoint", "100",
    ]  # fmt: skip


def test_run_menu_saves_a_slurm_script_with_the_runs_config(qtbot, window, tmp_path):
    from finetune_studio.studio.widgets.slurm_dialog import SlurmOptions

    win, ids = window
    page = win.runs_page
    page.select_ids([ids[0]])
    menu = {a.text(): a for a in page.run_menu().actions()}
    assert menu["Save SLURM script…"].isEnabled() and menu["Open"].isEnabled()
    asked: list = []
    page.choose_slurm_options = lambda run: (
        asked.append(run["id"])
        or SlurmOptions(nodes=3, gpus_per_node=4, time="02:00:00", partition="gpu", home="/shared/studio")
    )
    target = tmp_path / "jobs" / "alpha.sbatch"
    target.parent.mkdir()
    page.choose_slurm_file = lambda suggested: str(target)
    with qtbot.waitSignal(page.message, timeout=1000) as said:
        menu["Save SLURM script…"].trigger()
    assert asked == [ids[0]] and said.args[0].startswith(f"Saved {target}")
    script = target.read_text(encoding="utf-8")
    config_path = tmp_path / "jobs" / "alpha.config.json"
    assert json.loads(config_path.read_text(encoding="utf-8"))["run_name"] == "alpha"
    assert "#SBATCH --nodes=3" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --time=02:00:00" in script and "#SBATCH --partition=gpu" in script
    assert "export FINETUNE_STUDIO_HOME=/shared/studio" in script
    assert f"train {config_path} --nproc 4 --nnodes 3" in script and '--rdzv-endpoint "$head_node:29500"' in script
    assert target.stat().st_mode & 0o111  # executable
    assert sorted(p.name for p in target.parent.iterdir()) == ["alpha.config.json", "alpha.sbatch"]  # no temp left
    # the same generator as the engine's `slurm` command
    from finetune_studio.core.slurm import sbatch_script

    assert script == sbatch_script(
        str(config_path),
        nodes=3,
        gpus_per_node=4,
        job_name="finetune-alpha",
        time="02:00:00",
        partition="gpu",
        home="/shared/studio",
    )
    # cancelled in the file dialog: nothing written, nothing said
    page.choose_slurm_file = lambda suggested: ""
    target.unlink()
    menu = {a.text(): a for a in page.run_menu().actions()}
    menu["Save SLURM script…"].trigger()
    assert not target.exists()
    # an unwritable place is told, not raised
    page.choose_slurm_file = lambda suggested: str(tmp_path / "missing" / "x.sbatch")
    with qtbot.waitSignal(page.message, timeout=1000) as said:
        page.save_slurm()
    assert said.args[0].startswith("Could not save the SLURM script")
    page.select_ids(ids[:2])
    assert not {a.text(): a for a in page.run_menu().actions()}["Save SLURM script…"].isEnabled()


def test_slurm_dialog_gives_the_options_it_shows(qtbot):
    from finetune_studio.studio.widgets.slurm_dialog import SlurmDialog, SlurmOptions

    dialog = SlurmDialog("alpha")
    qtbot.addWidget(dialog)
    assert dialog.options() == SlurmOptions()  # 2 nodes x 8 GPUs, 24 h, the cluster's partition
    dialog.nodes.setValue(4)
    dialog.gpus.setValue(2)
    dialog.time.setText(" ")
    dialog.partition.setText(" a100 ")
    dialog.home.setText("/shared/studio")
    assert dialog.options() == SlurmOptions(4, 2, "24:00:00", "a100", "/shared/studio")


def two_sessions(store: Store, status: str) -> str:
    """A run trained 10 steps in 100 s, stopped, then resumed from step 10 (the engine's step time starts again at 0)
    for 5 steps in 20 s; its finished_at is still the first session's."""
    import os
    import time

    from finetune_studio.core.store import process_start

    run_id = store.create_run({"model": "m", "max_steps": 20}, run_id="resumed", name="resumed")
    for s in range(1, 11):
        store.add_metrics(run_id, "train", s, {"loss": 1.0, "elapsed_s": 10.0 * s})
    for s in range(11, 16):
        store.add_metrics(run_id, "train", s, {"loss": 1.0, "elapsed_s": 4.0 * (s - 10)})
    start = time.time() - 30
    alive = {"pid": os.getpid(), "pid_start": process_start(os.getpid())} if status == "running" else {}
    store.update_run(run_id, status=status, started_at=start, finished_at=start - 500, step=15, **alive)
    return run_id


@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_a_resumed_runs_duration_adds_its_sessions_and_is_never_negative(qtbot, status):
    from finetune_studio.studio.widgets.runs_model import COLUMNS, RunsModel, earlier_sessions

    store = Store()
    run_id = two_sessions(store, status)
    assert earlier_sessions(store) == {run_id: 100.0}  # the first session's time at its last step
    model = RunsModel()
    model.set_runs(store.list_runs(), earlier_sessions(store))
    column = [key for key, _ in COLUMNS].index("duration")
    text = model.data(model.index(0, column))
    minutes, seconds = (int(x) for x in text.split(":"))
    total = 60 * minutes + seconds
    # 100 s before the resume, then this session's 30 s: up to now while it trains, else up to its last update
    # (the database sets updated_at when the row was last written, here now)
    assert 129 <= total <= 140, text


def test_a_run_never_resumed_has_no_earlier_sessions(qtbot):
    from finetune_studio.studio.widgets.runs_model import earlier_sessions

    store = Store()
    seed(store)
    assert earlier_sessions(store) == {}


def test_export_as_into_a_previous_export_is_refused_before_the_engine_starts(qtbot, window, tmp_path):
    from finetune_studio.core.export_target import MARKER, marker_text
    from finetune_studio.studio.widgets.export_dialog import ExportOptions

    win, ids = window
    dialog = win.export_dialog
    previous = tmp_path / "exported"
    previous.mkdir()
    (previous / "adapter_model.safetensors").write_bytes(b"x")
    (previous / MARKER).write_text(marker_text(["adapter_model.safetensors"]), encoding="utf-8")
    calls: list = []
    win.export_job.command = recording(fake_engine("time.sleep(30)"), calls)
    dialog.start(ids[0], ExportOptions(out=str(previous)))
    assert calls == [] and not win.export_job.running  # refused at once, no engine started
    assert "holds a previous export" in dialog.verdict.text() and "--force" not in dialog.verdict.text()
    assert "Replace it" in dialog.verdict.text() and dialog.replace_button.isVisible()
    assert dialog.windowTitle() == "Export alpha"  # the run's name, not its id


def test_export_shows_it_is_working_the_modelfile_and_what_was_not_checked(qtbot, window, tmp_path):
    import json as _json

    from finetune_studio.studio.widgets import export_dialog

    win, ids = window
    dialog = win.export_dialog
    (tmp_path / "check.json").write_text(
        _json.dumps(
            {"passed": True, "notes": ["llama-cpp-python is not installed: GGUF checked through transformers"]}
        ),
        encoding="utf-8",
    )
    win.export_job.command = fake_engine(
        f"""
        emit(type="progress", stage="check", done=2, total=3, message="Checking that the export reloads")
        time.sleep({export_dialog.QUIET_S + 2})
        emit(type="export", run_id="2026-0", path={str(tmp_path)!r}, passed=True, checkpoint="final",
             verdict="passed", formats=["adapter", "gguf-q8_0", "ollama"])
        """
    )
    dialog.start(ids[0])
    qtbot.waitUntil(lambda: "working" in dialog.stage.text(), timeout=20_000)
    assert dialog.stage.text().startswith("Checking that the export reloads")
    assert dialog.bar.maximum() == 0  # busy: a moving bar, not a bar stuck at 66 %
    qtbot.waitUntil(lambda: dialog.result is not None, timeout=20_000)
    verdict = dialog.verdict.text()
    assert "Modelfile" in verdict and str(tmp_path / "gguf" / "Modelfile") in verdict
    assert "Not checked" in verdict and "llama-cpp-python is not installed" in verdict

    dialog.open_url = lambda _url: False  # no file manager registered
    dialog.open_button.click()
    assert "No file manager" in dialog.stage.text() and dialog.copy_button.isVisible()
    dialog.copy_button.click()
    from PySide6.QtWidgets import QApplication

    assert QApplication.clipboard().text() == str(tmp_path)


def test_init_adapter_offers_runs_by_name_and_keeps_their_ids(qtbot, make_window, tmp_path):
    store = Store()
    sft = store.create_run({"model": "m"}, run_id="20261207-013549-58921c", name="sft-demo")
    dpo = store.create_run({"model": "m"}, run_id="20261207-020000-aaaaaa", name="dpo-1", parent_run_id=sft)
    for rid in (sft, dpo):
        store.update_run(rid, status="completed")
    win = make_window({"init_adapter": dpo})
    field = (
        win.setup_page.basic_form.editors.get("init_adapter") or win.setup_page.advanced_form.editors["init_adapter"]
    )
    state = win.setup_state
    assert field.currentText() == "dpo-1 from sft-demo" and state.values["init_adapter"] == dpo
    field.refresh()
    field.setCurrentIndex(field.findText("sft-demo"))
    assert state.values["init_adapter"] == sft
    assert field.itemData(field.currentIndex(), Qt.ItemDataRole.ToolTipRole).startswith(sft)
    field.setEditText("sft-demo:step-000040")  # a checkpoint of the run, as Annotate's hand-off writes it
    assert state.values["init_adapter"] == f"{sft}:step-000040"
    folder = str(tmp_path / "my-adapter")
    field.setEditText(folder)
    assert state.values["init_adapter"] == folder


def test_objective_column_reads_the_objectives_labels(qtbot):
    from finetune_studio.studio.widgets.runs_model import COLUMNS, RunsModel

    store = Store()
    for objective in ("distill", "reward", "grpo"):
        store.create_run({"model": "m", "objective": objective, "method": "lora"}, run_id=objective, name=objective)
    model = RunsModel()
    model.set_runs(store.list_runs())
    column = [key for key, _ in COLUMNS].index("objective")
    shown = {model.index(r, 0).data(): model.index(r, column).data() for r in range(model.rowCount())}
    assert shown == {"distill": "Distil", "reward": "Reward model", "grpo": "GRPO"}
