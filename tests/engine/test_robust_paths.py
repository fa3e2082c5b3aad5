"""Run folders and paths under faults (issue 22, item 7): a moved or copied data home, a checkpoint reference
that leaves its run, files readable by other users."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.store import Store
from finetune_studio.engine.train.recipe import StopFlag, TrainingFailed, train_run
from finetune_studio.engine.train.reporting import Reporter

ROOT = Path(__file__).resolve().parents[2]


def engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def events_of(stdout: str) -> list:
    return [parse_event(line) for line in stdout.splitlines() if line.strip()]


def _stopped_run(tmp_path: Path, tiny_model_dir: Path):
    """A run of the tiny model stopped after its second step (with a checkpoint there)."""
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=4)
    stop = StopFlag()
    result = train_run(
        config,
        reporter=Reporter(extra=lambda e: stop.set() if e.type == "step" and e.step >= 2 else None),
        stop=stop,
    )
    assert result.status == "stopped" and result.step == 2
    return result


def _resume_in(new_home: Path, run_id: str, monkeypatch) -> list:
    monkeypatch.setenv("FINETUNE_STUDIO_HOME", str(new_home))
    out = engine("train", "--resume", run_id)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return events_of(out.stdout)


def test_a_moved_data_home_resumes_in_the_new_home(tmp_path, tiny_model_dir, studio_home, monkeypatch):
    first = _stopped_run(tmp_path, tiny_model_dir)
    new_home = tmp_path / "moved-home"
    shutil.move(str(studio_home), str(new_home))
    events = _resume_in(new_home, first.run_id, monkeypatch)
    started = [e for e in events if e.type == "started"][-1]
    assert started.resumed_from_step == 2
    assert Path(started.run_dir) == new_home / "runs" / first.run_id
    assert events[-1].type == "finished" and events[-1].status == "completed"
    assert (new_home / "runs" / first.run_id / "adapter" / "adapter_config.json").is_file()
    assert not studio_home.exists()  # nothing was written where the home used to be
    run = Store().get_run(first.run_id)
    assert run.status == "completed" and Path(run.run_dir) == new_home / "runs" / first.run_id


def test_a_copied_data_home_resumes_in_the_copy_and_leaves_the_original_alone(
    tmp_path, tiny_model_dir, studio_home, monkeypatch
):
    first = _stopped_run(tmp_path, tiny_model_dir)
    store = Store()  # recorded as an older app did: the absolute folder in the original home
    store.update_run(first.run_id, run_dir=str(studio_home / "runs" / first.run_id))
    store.close()
    copy = tmp_path / "copied-home"
    shutil.copytree(studio_home, copy)
    events = _resume_in(copy, first.run_id, monkeypatch)
    assert Path([e for e in events if e.type == "started"][-1].run_dir) == copy / "runs" / first.run_id
    assert (copy / "runs" / first.run_id / "adapter" / "adapter_config.json").is_file()
    original = studio_home / "runs" / first.run_id
    assert not (original / "adapter").exists()  # the original home's run is as it was: stopped at step 2
    kinds = [json.loads(line)["type"] for line in (original / "events.jsonl").read_text().splitlines()]
    assert kinds[-1] == "finished" and kinds.count("started") == 1
    # the run is found by its new folder too
    assert Store().find_run(str(copy / "runs" / first.run_id)).id == first.run_id


def test_a_new_run_records_its_folder_relative_to_the_data_home(tmp_path, tiny_model_dir, studio_home):
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=1)
    result = train_run(config, reporter=Reporter(extra=Recorder()))
    store = Store()
    (row,) = store.db.execute("select run_dir, adapter_dir from runs where id = ?", [result.run_id]).fetchall()
    assert row[0] == f"runs/{result.run_id}" and not Path(row[1]).is_absolute()
    run = store.get_run(result.run_id)
    assert Path(run.run_dir) == studio_home / "runs" / result.run_id
    assert Path(run.adapter_dir) == studio_home / "runs" / result.run_id / "adapter"
    assert store.find_run(str(studio_home / "runs" / result.run_id)).id == result.run_id


def test_a_checkpoint_reference_that_leaves_its_run_is_refused(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=1)
    first = train_run(config, reporter=Reporter(extra=Recorder()))
    (first.run_dir / "checkpoints").mkdir(exist_ok=True)  # as in a run that saved checkpoints
    outside = tmp_path / "outside" / "adapter"
    shutil.copytree(first.run_dir / "adapter", outside)  # a real adapter, in no run
    for ref in (f"{first.run_id}:../../../../outside/adapter", f"{first.run_id}:{outside}"):
        rec = Recorder()
        with pytest.raises(TrainingFailed) as info:
            train_run(
                tiny_config(tiny_model_dir, tmp_path / "d.jsonl", max_steps=1, init_adapter=ref),
                reporter=Reporter(extra=rec),
            )
        (failed,) = rec.of("failed")
        assert failed.kind == "config" and "init_adapter" in failed.message
        assert "step-000050" in failed.message  # says what a checkpoint reference looks like
        run = Store().get_run(info.value.result.run_id)
        assert run.parent_run_id == "" and run.init_adapter == ""  # never recorded as started from the run


# --- other local users: private data home, temporary names no one can plant --------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_data_home_runs_and_database_are_private_to_their_owner(tmp_path, tiny_model_dir, studio_home):
    studio_home.chmod(0o755)  # as an older app left it
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=1)
    (tmp_path / "c.json").write_text(config.to_json())
    out = engine("train", str(tmp_path / "c.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    started = next(e for e in events_of(out.stdout) if e.type == "started")
    assert _mode(studio_home) == 0o700
    assert _mode(studio_home / "runs") == 0o700 and _mode(Path(started.run_dir)) == 0o700
    for name in ("studio.sqlite3", "studio.sqlite3-wal", "studio.sqlite3-shm"):
        if (studio_home / name).exists():
            assert _mode(studio_home / name) == 0o600, name


def test_a_planted_symlink_at_a_temporary_name_is_never_written_through(tmp_path):
    import os

    from finetune_studio.core import paths

    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's\n")
    target = tmp_path / "folder" / "config.json"
    target.parent.mkdir()
    (target.parent / f".{target.name}.tmp-{os.getpid()}").symlink_to(victim)  # the name it used to take
    paths.atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n" and not target.is_symlink()
    assert victim.read_text() == "someone else's\n"
    assert _mode(target) == 0o666 & ~_umask()  # the mode any new file gets here, as before


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
