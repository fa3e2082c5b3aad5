"""The engine under faults (issue 8): memory guard, stale pids, CPU out of memory, a corrupt database, set-up
stop, leftovers of killed processes."""

from __future__ import annotations

import pytest
from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.store import Store
from finetune_studio.engine.train.recipe import TrainingFailed, train_run
from finetune_studio.engine.train.reporting import Reporter


def _failed(config):
    rec = Recorder()
    with pytest.raises(TrainingFailed) as info:
        train_run(config, reporter=Reporter(extra=rec))
    (failed,) = rec.of("failed")
    run = Store().get_run(info.value.result.run_id)
    assert run["status"] == "failed" and run["error_kind"] == failed.kind
    return failed


def test_a_rank_above_the_layer_width_is_refused_naming_the_field(tmp_path, tiny_model_dir):
    failed = _failed(tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), lora_rank=1_000_000))
    assert failed.kind == "config" and "lora_rank" in failed.message and "at most 64" in failed.message


def test_a_run_the_estimate_says_cannot_fit_is_refused_unless_overridden(tmp_path, tiny_model_dir, monkeypatch):
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.engine.train import memory_budget

    # A machine with 64 MiB: the tiny model's run (about 0.6 GiB with the runtime) cannot fit on it.
    small = DeviceInfo("cpu", "a 64 MiB machine", 64 * 2**20, 64 * 2**20, False)
    monkeypatch.setattr(memory_budget, "device_info", lambda device: small)
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=2)
    failed = _failed(config)
    assert failed.kind == "oom" and "ignore_memory_check" in failed.message and "64 MiB free" in failed.message
    assert Store().get_run(failed.run_id)["status"] == "failed"  # never left 'running'
    result = train_run(config.replace(ignore_memory_check=True), reporter=Reporter(extra=Recorder()))
    assert result.status == "completed"  # the person overrode the estimate: the run goes ahead


def _running_run(store: Store, pid: int, start: str) -> str:
    run_id = store.create_run({"model": "m", "dataset": "d"}, run_dir="")
    store.update_run(run_id, status="running", pid=pid, pid_start=start)
    return run_id


def test_a_reused_pid_is_not_trusted_and_never_signalled(tmp_path):
    import signal
    import subprocess
    import sys

    from finetune_studio.core.store import process_start, signal_process

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # an unrelated live process
    try:
        store = Store()
        real = process_start(other.pid)
        assert real
        stale = _running_run(store, other.pid, "some-earlier-boot:12345")  # what a dead engine recorded
        live = _running_run(store, other.pid, real)
        assert store.get_run(stale)["status"] == "interrupted"
        assert store.get_run(live)["status"] == "running"
        assert [r["id"] for r in store.list_runs(status="running") if r["status"] == "running"] == [live]
        assert not signal_process(other.pid, "some-earlier-boot:12345", signal.SIGTERM)
        assert other.poll() is None  # still alive: nothing was sent
        assert signal_process(other.pid, real, signal.SIGTERM)
        assert other.wait(timeout=10) == -signal.SIGTERM
    finally:
        other.kill()
        other.wait()


def test_resume_of_a_run_whose_pid_was_reused_is_allowed(tmp_path, tiny_model_dir):
    import os

    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=2)
    first = train_run(config, reporter=Reporter(extra=Recorder()))
    store = Store()
    store.update_run(first.run_id, status="running", pid=os.getpid(), pid_start="another-boot:1")  # pid reused
    assert store.get_run(first.run_id)["status"] == "interrupted"
    resumed = train_run(resume=first.run_id, reporter=Reporter(extra=Recorder()))
    assert resumed.status == "completed"


def test_torch_cpu_allocator_failure_is_out_of_memory_with_advice():
    import torch

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train.errors import classify

    with pytest.raises(RuntimeError) as info:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the CPU allocator refuses
    assert "DefaultCPUAllocator" in str(info.value)
    config = TrainConfig(dataset="d.jsonl", batch_size=8, max_length=2048)
    kind, message = classify(info.value, config, 5)
    assert kind == "oom"
    assert "step 5" in message and "batch_size (now 8" in message and "max_length (now 2048)" in message


def _store_with_runs(n_metrics: int = 3000) -> tuple:
    from finetune_studio.core import paths

    store = Store()
    ids = [store.create_run({"model": "m", "dataset": f"d{i}"}, run_dir="") for i in range(2)]
    with store.db.conn:
        for step in range(n_metrics):
            store.add_metrics(ids[0], "train", step, {"loss": 1.0 / (step + 1), "lr": 1e-4})
    store.close()
    return paths.db_path(), ids


def test_a_database_with_a_damaged_header_is_named_kept_and_replaced(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    from finetune_studio.core.db_recovery import DatabaseDamaged

    db, _ids = _store_with_runs(10)
    with open(db, "r+b") as fh:
        fh.write(b"this is no sqlite header!")
    damaged = db.read_bytes()
    with pytest.raises(DatabaseDamaged, match=str(db)):
        Store()
    config = tmp_path / "c.json"
    config.write_text(tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl")).to_json())
    engine = [sys.executable, "-P", "-m", "finetune_studio.engine"]
    run = subprocess.run([*engine, "train", str(config)], capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 1 and events[-1]["type"] == "failed", run.stderr[-2000:]
    assert (
        events[-1]["kind"] == "database" and str(db) in events[-1]["message"] and "db recover" in events[-1]["message"]
    )
    assert "Traceback" not in run.stderr
    assert db.read_bytes() == damaged  # nothing touched without being asked
    check = subprocess.run([*engine, "db", "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "damaged" in check.stdout
    fix = subprocess.run([*engine, "db", "recover"], capture_output=True, text=True, timeout=60)
    assert fix.returncode == 3, fix.stderr  # recovered, but the rows stay in the kept file only: said so
    (kept,) = db.parent.glob("studio.sqlite3.corrupt-*[0-9]")
    assert kept.read_bytes() == damaged and str(kept) in fix.stdout and "NOT everything came back" in fix.stdout
    assert Store().list_runs() == []  # a fresh, working database


def test_db_recover_keeps_every_label_and_names_the_rows_left_in_the_kept_file(tmp_path):
    import re
    import subprocess
    import sys

    from db_damage import garble, labelled_store, leaf_pages

    db = labelled_store()
    before = Store().preferences.stats()
    pages = leaf_pages(db, "comparisons")
    garble(db, [pages[len(pages) // 2]])
    engine = [sys.executable, "-P", "-m", "finetune_studio.engine"]
    fix = subprocess.run([*engine, "db", "recover"], capture_output=True, text=True, timeout=120)
    assert fix.returncode == 3 and "Traceback" not in fix.stderr, fix.stderr
    print(fix.stdout)
    (kept,) = db.parent.glob("studio.sqlite3.corrupt-*[0-9]")
    assert str(kept) in fix.stdout and "NOT everything came back: rows of comparisons" in fix.stdout
    copied, lost = map(int, re.search(r"comparisons: (\d+) rows \((\d+) unreadable\)", fix.stdout).groups())
    assert copied + lost == before["comparisons"] and copied > before["comparisons"] // 2
    for table, n in (("prompts", before["prompts"]), ("candidates", before["candidates"]), ("edits", 1)):
        assert f"  {table}: {n} rows\n" in fix.stdout  # untouched tables: every row, no loss
    after = Store().preferences.stats()
    assert after["comparisons"] == copied and after["snapshots"] == 1 and after["decision_changes"] == 1


def test_recovery_copies_every_readable_row(tmp_path):
    from finetune_studio.core import db_recovery

    db, ids = _store_with_runs(3000)
    size = db.stat().st_size
    with open(db, "r+b") as fh:  # wreck the last third of the file: metric pages, not the runs' first pages
        fh.seek(size * 2 // 3)
        fh.write(b"\xde\xad" * (size // 6))
    assert db_recovery.damage(db)
    result = db_recovery.recover(db)
    print(result.summary())
    assert result.kept.exists() and result.kept.stat().st_size == size
    store = Store()
    assert sorted(r["id"] for r in store.list_runs()) == sorted(ids)
    assert 0 < len(store.metrics(ids[0])) <= 3000
    assert db_recovery.damage(db) == ""


def test_stop_during_set_up_ends_the_run_at_once(tmp_path, tiny_model_dir):
    from finetune_studio.engine.train.recipe import StopFlag

    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=1000), max_steps=3)
    stop, rec = StopFlag(), Recorder()

    def listener(event):
        rec(event)
        if event.type == "progress" and event.stage == "tokenize":
            stop.set()  # what SIGTERM does, while the first rows are being tokenised

    result = train_run(config, reporter=Reporter(extra=listener), stop=stop)
    assert result.status == "stopped" and result.step == 0
    assert len([e for e in rec.of("progress") if e.stage == "tokenize"]) == 1  # no further row was tokenised
    assert not rec.of("started") and not rec.of("step")
    assert rec.of("finished")[-1].status == "stopped"
    assert Store().get_run(result.run_id)["status"] == "stopped"


def test_leftovers_of_killed_processes_are_cleaned_at_the_next_start(tmp_path, tiny_model_dir):
    from finetune_studio.engine import checkpoint
    from finetune_studio.engine.train.recipe import StopFlag

    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=3)
    stop = StopFlag()
    first = train_run(  # stopped once training began: after the first step, with a checkpoint
        config, reporter=Reporter(extra=lambda e: stop.set() if e.type == "started" else None), stop=stop
    )
    assert first.status == "stopped" and first.step == 1
    leftovers = [
        first.run_dir / "checkpoints" / ".tmp-step-000002-999999",
        first.run_dir / ".adapter-tmp-999999",
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half written")
    rec = Recorder()
    resumed = train_run(resume=first.run_id, reporter=Reporter(extra=rec))
    assert resumed.status == "completed" and (resumed.run_dir / "adapter" / "adapter_config.json").is_file()
    assert not any(folder.exists() for folder in leftovers)
    assert sum("half-written" in e.message for e in rec.of("log")) == 2
    # Killed after moving the old adapter aside but before the new one was in place: it is put back.
    aside = resumed.run_dir / ".adapter-old-999999"
    (resumed.run_dir / "adapter").rename(aside)
    checkpoint.clean_leftovers(resumed.run_dir)
    assert (resumed.run_dir / "adapter" / "adapter_config.json").is_file() and not aside.exists()
