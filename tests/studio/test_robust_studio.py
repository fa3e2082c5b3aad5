"""The app under faults (issue 8): a damaged database is named, kept and recovered with consent; a stale pid is
never followed or signalled; the smoothed curve after an in-app resume."""

from __future__ import annotations

import pytest
from studio_support import IGNORE_OFFSCREEN, start_with

from finetune_studio.core import paths
from finetune_studio.core.store import Store
from finetune_studio.studio import db_guard

pytestmark = IGNORE_OFFSCREEN


def test_a_damaged_database_is_named_and_recovered_with_consent(qtbot, make_window):
    db = paths.db_path()
    Store().close()
    db.write_bytes(b"garbage, not a database" * 100)
    asked, told = [], []
    assert not db_guard.ensure_database(lambda t, text: asked.append(text) or False, lambda t, m: told.append(m))
    assert str(db) in asked[0] and "nothing is deleted" in asked[0]
    assert db.read_bytes() == b"garbage, not a database" * 100 and not told  # declined: untouched
    assert db_guard.ensure_database(lambda t, text: True, lambda t, m: told.append(m))
    (kept,) = db.parent.glob("studio.sqlite3.corrupt-*[0-9]")
    assert kept.read_bytes() == b"garbage, not a database" * 100
    assert str(kept) in told[0] and "NOT everything came back" in told[0]  # a wrecked header: nothing readable
    win = make_window()  # the app now opens on the fresh database
    win.runs_page.refresh()
    assert win.runs_page.model.runs == []
    assert db_guard.ensure_database(lambda t, text: pytest.fail("asked again"), lambda t, m: None)


def test_recover_in_the_app_keeps_every_label_and_says_what_stays_in_the_kept_file(qtbot):
    from db_damage import garble, labelled_store, leaf_pages

    db = labelled_store()
    before = Store().preferences.stats()
    pages = leaf_pages(db, "candidates")
    garble(db, [pages[len(pages) // 2]])
    asked, told = [], []
    assert db_guard.ensure_database(lambda t, text: asked.append(text) or True, lambda t, m: told.append((t, m)))
    assert "comparisons" in asked[0] and "prompts" in asked[0]  # it promises the labels, and keeps the promise
    (kept,) = db.parent.glob("studio.sqlite3.corrupt-*[0-9]")
    ((title, text),) = told
    assert title == "Database recovered, not completely" and str(kept) in text
    assert "NOT everything came back: rows of candidates" in text
    assert f"comparisons: {before['comparisons']} rows\n" in text and f"prompts: {before['prompts']} rows" in text
    after = Store().preferences.stats()
    assert after["comparisons"] == before["comparisons"] and 0 < after["candidates"] < before["candidates"]


def test_the_smoothed_curve_does_not_jump_after_a_resume():
    from finetune_studio.core.protocol.events import Step
    from finetune_studio.studio.state.run import RunState

    def step(i: int) -> Step:
        loss = 4.0 / i + (0.3 if i % 3 else 0.0)
        return Step(i, 40, loss, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0, memory_used_bytes=0, memory_peak_bytes=0)

    straight, resumed = RunState(), RunState()
    for i in range(1, 41):
        straight.apply(step(i))
    for i in [*range(1, 31), *range(21, 41)]:  # stopped at 30, resumed from the checkpoint at step 20
        resumed.apply(step(i))
    assert list(resumed.train.column("step")) == list(range(1, 41))
    assert list(resumed.train.column("loss_smooth")) == list(straight.train.column("loss_smooth"))
    from_db = RunState()  # the same when the history comes from the database (a followed run)
    from_db.load_history([{"step": i, "loss": step(i).loss} for i in range(1, 31)], [])
    from_db.load_history([{"step": i, "loss": step(i).loss} for i in range(21, 41)], [])
    assert list(from_db.train.column("loss_smooth")) == list(straight.train.column("loss_smooth"))


def test_a_kill_after_the_database_recorded_the_end_is_not_a_crash(qtbot, window):
    store = Store()
    store.create_run({"model": "m", "dataset": "d"}, run_id="fake-run")
    store.update_run("fake-run", status="completed", step=2)  # what the engine wrote just before it was killed
    outcome = start_with(qtbot, window, "started(total=2); step(1, 2); step(2, 2); os.kill(os.getpid(), 9)")
    assert outcome.status == "completed" and window.run_state.status == "completed"
    assert window.train_page.status.text() != "Failed"


def test_a_run_whose_pid_was_reused_is_shown_interrupted_and_never_signalled(qtbot, make_window):
    import signal
    import subprocess
    import sys

    from finetune_studio.core.store import process_start

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = Store()
        stale = store.create_run({"model": "m", "dataset": "d"}, run_id="stale-run")
        store.update_run(stale, status="running", pid=other.pid, pid_start="an-earlier-boot:42")
        win = make_window()
        assert win.controller.find_live_run() is None
        assert win.controller.open_run(stale) and win.run_state.status == "interrupted"
        win.controller.stop()
        assert other.poll() is None  # the unrelated process got nothing
        live = store.create_run({"model": "m", "dataset": "d"}, run_id="live-run")
        store.update_run(live, status="running", pid=other.pid, pid_start=process_start(other.pid))
        assert win.controller.open_run(live) and win.run_state.status == "running"
        win.controller.stop()  # the recorded process itself: it is asked to stop
        assert other.wait(timeout=10) == -signal.SIGTERM
        win.controller.follow_timer.stop()
    finally:
        other.kill()
        other.wait()
