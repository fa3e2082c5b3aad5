"""One vocabulary of run statuses, and the app and the engine agree on what each one allows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from studio_support import IGNORE_OFFSCREEN

from finetune_studio.core.config import ConfigError
from finetune_studio.core.run_status import (
    RUN_STATUSES,
    RunStatus,
    is_exportable,
    is_finished,
    is_resumable,
    parse_status,
)
from finetune_studio.core.store import Store

pytestmark = IGNORE_OFFSCREEN


def test_members_are_the_stored_strings():
    assert [s.value for s in RUN_STATUSES] == ["created", "running", "completed", "stopped", "failed", "interrupted"]
    assert RunStatus.STOPPED == "stopped" and json.dumps(RunStatus.FAILED) == '"failed"'
    assert parse_status("interrupted") is RunStatus.INTERRUPTED and parse_status("starting") is None


def test_the_rules():
    assert [s for s in RunStatus if is_resumable(s)] == ["stopped", "failed", "interrupted"]
    assert [s for s in RunStatus if is_exportable(s)] == ["completed", "stopped", "failed", "interrupted"]
    assert [s for s in RunStatus if not is_finished(s)] == ["created", "running"]
    assert not is_resumable("starting") and not is_exportable(None)  # app-only states allow nothing


def test_a_stored_string_reads_back_as_before(tmp_path):
    store = Store()
    run_id = store.create_run({"max_steps": 3})
    assert store.get_run(run_id)["status"] == "created"
    store.update_run(run_id, status=RunStatus.STOPPED)
    row = store.db.execute("select status, typeof(status) from runs where id = ?", [run_id]).fetchone()
    assert row == ("stopped", "text")
    store.update_run(run_id, status=RunStatus.RUNNING, pid=2**22 + 12345)  # no such process
    assert store.get_run(run_id)["status"] == RunStatus.INTERRUPTED
    store.close()


def _seed_run(store: Store, status: RunStatus, tmp_path) -> str:
    """A run whose folder holds one checkpoint with an adapter, stored under ``status``."""
    run_id = f"run-{status}"
    run_dir = tmp_path / run_id
    ckpt = run_dir / "checkpoints" / "step-00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path)}))
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5}))
    (run_dir / "config.json").write_text("{}")
    store.create_run({"max_steps": 10}, run_id=run_id, run_dir=str(run_dir))
    stored = RunStatus.RUNNING if status == RunStatus.INTERRUPTED else status
    pid = os.getpid() if status == RunStatus.RUNNING else (2**22 + 12345 if stored == RunStatus.RUNNING else None)
    store.update_run(run_id, status=stored, pid=pid, step=5)
    return run_id


def test_app_and_engine_agree_on_export_and_resume(qtbot, tmp_path):
    from finetune_studio.engine.checkpoint import checkpoints_dir
    from finetune_studio.engine.export.writer import ExportError, export_adapter
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.studio.pages.runs_page import RunsPage
    from finetune_studio.studio.pages.train_page import TrainPage
    from finetune_studio.studio.state.run import MemoryState, RunState

    store = Store()
    ids = {status: _seed_run(store, status, tmp_path) for status in RunStatus}
    assert checkpoints_dir(tmp_path / ids[RunStatus.STOPPED]).name == "checkpoints"
    runs_page = RunsPage(store_factory=Store)
    qtbot.addWidget(runs_page)
    runs_page.refresh()
    run_state = RunState()
    train_page = TrainPage(run_state, MemoryState())
    qtbot.addWidget(train_page)
    for status, run_id in ids.items():
        assert store.get_run(run_id)["status"] == status
        runs_page.select_ids([run_id])
        run_state.reset()
        run_state.info.run_id = run_id
        run_state.set_status(status)
        # Export: both pages offer it exactly when the engine's export succeeds.
        try:
            export_adapter(run_id, tmp_path / f"out-{status}")
            exported, why = True, ""
        except ExportError as exc:
            exported, why = False, str(exc)
        assert exported == runs_page.export_button.isEnabled() == train_page.export_button.isEnabled(), (status, why)
        assert runs_page.export_button.isEnabled() == is_exportable(status)
        # Resume: both pages offer it; the engine refuses exactly the others before doing any work.
        assert runs_page.resume_button.isEnabled() == train_page.resume_button.isEnabled() == is_resumable(status)
        if not is_resumable(status):
            with pytest.raises(ConfigError, match="cannot be resumed"):
                train_run(resume=run_id)
    store.close()
    # The case the app used to refuse, through the engine's command line as the studio runs it.
    done = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "finetune_studio.engine",
            "export",
            ids[RunStatus.INTERRUPTED],
            str(tmp_path / "x"),
            "--no-check",  # the seeded adapter is placeholder bytes: this is about which runs may export
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and (tmp_path / "x" / "adapter_model.safetensors").is_file(), done.stderr
