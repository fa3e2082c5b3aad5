"""The train page through the app with a fake engine: failures shown clearly, stop, close while training."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest
from PySide6.QtCore import Qt
from studio_support import IGNORE_OFFSCREEN, STEPS, fake_engine, start_with

from finetune_studio.core.store import Store, pid_alive

pytestmark = IGNORE_OFFSCREEN


def test_out_of_memory_message_is_shown(qtbot, window):
    outcome = start_with(
        qtbot,
        window,
        """
        started(); step(1); step(2)
        emit(type="failed", run_id="fake-run", kind="oom",
             message="Out of memory at step 3 (needed 9.1 GiB of 8 GiB). Lower batch_size to 2 or use QLoRA.")
        sys.exit(1)
    """,
    )
    page = window.train_page
    assert outcome.status == "failed" and window.run_state.status == "failed"
    assert page.message.isVisible() and "Out of memory" in page.message.text()
    assert "Lower batch_size to 2" in page.message.text()
    assert page.status.text() == "Failed" and not page.stop_button.isEnabled()
    assert page.charts.state.train.n == 2


def test_crash_mid_run_is_explained_with_the_last_output(qtbot, window):
    outcome = start_with(
        qtbot,
        window,
        """
        started(); step(1)
        sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: CUDA error: device-side assert\\n")
        sys.stderr.flush(); os._exit(1)
    """,
    )
    assert outcome.status == "crashed"
    text = window.train_page.message.text()
    assert "exited unexpectedly" in text and "device-side assert" in text
    assert "Traceback" not in text.split("Last output")[0]  # the explanation comes first, the trace after
    assert "RuntimeError: CUDA error" in window.train_page.log_view.toPlainText()


def test_malformed_line_goes_to_the_log_and_the_run_goes_on(qtbot, window):
    outcome = start_with(
        qtbot,
        window,
        """
        started(); print("garbage {", flush=True); step(1); step(2)
        emit(type="finished", run_id="fake-run", status="completed", step=2, final_loss=1.5)
    """,
    )
    assert outcome.status == "completed" and window.run_state.status == "completed"
    assert "could not read" in window.train_page.log_view.toPlainText()
    assert window.run_state.train.n == 2


def test_engine_that_never_starts(qtbot, window, tmp_path):
    window.controller.engine_argv = lambda *a: [str(tmp_path / "missing-python"), "-m", "finetune_studio.engine", *a]
    qtbot.waitUntil(lambda: window.setup_state.ready, timeout=15_000)
    with qtbot.waitSignal(window.controller.run_ended, timeout=30_000) as ended:
        window.setup_page.request_start()
    assert ended.args[0].status == "not_started"
    assert window.run_state.status == "failed"
    assert "could not be started" in window.train_page.message.text()


def test_stop_button_and_shortcuts(qtbot, window):
    win = window
    win.controller.engine_argv = fake_engine(
        STEPS
        + textwrap.dedent("""
        def on_term(*_):
            emit(type="checkpoint", step=3, path="/tmp/fake/ck")
            emit(type="finished", run_id="fake-run", status="stopped", step=3)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        started()
        for i in range(1, 50):
            step(i); time.sleep(0.1)
    """)
    )
    qtbot.waitUntil(lambda: win.setup_state.ready, timeout=15_000)
    win.activateWindow()
    win.setup_page.start_button.setFocus()
    qtbot.keyClick(win.setup_page.start_button, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: win.run_state.step >= 3, timeout=30_000)
    assert win.tabs.currentWidget() is win.train_page
    assert win.train_page.memory_bar.state.used_bytes == 2 << 30
    assert "device 16.0 GiB total" in win.train_page.memory_label.text()
    qtbot.waitUntil(lambda: "smoothed loss" in win.train_page.progress.format(), timeout=5000)
    assert win.run_memory.estimate.total_bytes == 3 << 30  # the engine's budget from 'started'
    with qtbot.waitSignal(win.controller.run_ended, timeout=30_000):
        qtbot.keyClick(win.train_page, Qt.Key.Key_Period, Qt.KeyboardModifier.ControlModifier)
    assert win.run_state.status == "stopped"
    assert "resumed" in win.train_page.message.text() or "resume" in win.train_page.message.text()
    qtbot.keyClick(win.train_page, Qt.Key.Key_3, Qt.KeyboardModifier.ControlModifier)
    assert win.tabs.currentWidget() is win.runs_page
    qtbot.keyClick(win.runs_page, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
    assert win.tabs.currentWidget() is win.setup_page


LONG_RUN = STEPS + textwrap.dedent("""
    from finetune_studio.core.store import Store
    store = Store()
    run_id = store.create_run({{"model": "m", "dataset": "d", "method": "lora", "objective": "sft", "max_steps": 500}})
    store.update_run(run_id, status="running", pid=os.getpid(), total_steps=500)
    def on_term(*_):
        store.update_run(run_id, status="stopped")
        emit(type="finished", run_id=run_id, status="stopped", step=1)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    emit(type="started", run_id=run_id, run_dir="/tmp/fake", total_steps=500)
    for i in range(1, 500):
        store.add_metrics(run_id, "train", i, {{"loss": 3.0 / i, "lr": 1e-4}})
        store.update_run(run_id, step=i)
        try:
            step(i, 500)
        except OSError:
            pass
        time.sleep(0.05)
""")


def start_long_fake_run(qtbot, win):
    """Start a scripted run that steps slowly until stopped; return once it is two steps in."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    win.controller.engine_argv = fake_engine(LONG_RUN.format(root=root))
    qtbot.waitUntil(lambda: win.setup_state.ready, timeout=15_000)
    win.setup_page.request_start()
    qtbot.waitUntil(lambda: win.run_state.step >= 2, timeout=30_000)
    return win


def test_close_asks_and_stop_waits_for_the_checkpoint(qtbot, window):
    win = start_long_fake_run(qtbot, window)
    asked = []
    win.ask_close_choice = lambda: asked.append(1) or "cancel"
    assert not win.close() and win.isVisible() and asked == [1]
    win.ask_close_choice = lambda: "stop"
    with qtbot.waitSignal(win.controller.run_ended, timeout=30_000):
        win.close()
    qtbot.waitUntil(lambda: not win.isVisible(), timeout=5000)
    assert Store().get_run(win.run_state.info.run_id)["status"] == "stopped"


def test_close_and_continue_then_the_next_start_follows(qtbot, window, make_window):
    win = start_long_fake_run(qtbot, window)
    run_id = win.run_state.info.run_id
    win.close_choice = "continue"
    with qtbot.waitSignal(win.controller.run_ended, timeout=30_000) as ended:
        win.close()
    assert ended.args[0].status == "detached"
    qtbot.waitUntil(lambda: not win.isVisible(), timeout=5000)
    pid = Store().get_run(run_id)["pid"]
    try:
        assert pid_alive(pid)
        again = make_window()
        qtbot.waitUntil(lambda: again.run_state.info.run_id == run_id, timeout=10_000)
        st = again.run_state
        assert st.following and st.status == "running" and st.info.total_steps == 500
        seen = st.step
        qtbot.waitUntil(lambda: st.step >= seen + 5, timeout=20_000)  # curves grow by polling the database
        assert list(st.train.column("step")) == list(range(1, st.step + 1))
        with qtbot.waitSignal(again.controller.run_ended, timeout=30_000):
            qtbot.mouseClick(again.train_page.stop_button, Qt.MouseButton.LeftButton)
        assert st.status == "stopped" and not st.following
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _step(i: int, elapsed: float, total: int = 40):
    from finetune_studio.core.protocol.events import Step

    return Step(
        step=i,
        total_steps=total,
        loss=1.0,
        lr=1e-4,
        grad_norm=1.0,
        tokens_per_s=100.0,
        memory_used_bytes=1,
        memory_peak_bytes=1,
        elapsed_s=elapsed,
    )


def test_elapsed_time_goes_on_across_a_resume_and_the_eta_stays_right():
    """The engine counts a session's time from 0: after a resume the elapsed time continues and the time left comes
    from the step rate (1 step per 2 s), not from a clock that went back."""
    from finetune_studio.core.protocol.events import Started
    from finetune_studio.studio.state.run import RunState

    st = RunState()
    st.apply(Started(run_id="r", run_dir="/tmp/r", total_steps=40))
    for i in range(1, 21):
        st.apply(_step(i, 2.0 * i))
    assert st.elapsed_s == 40.0
    st.apply(Started(run_id="r", run_dir="/tmp/r", total_steps=40, resumed_from_step=20))
    for i in range(21, 26):
        st.apply(_step(i, 2.0 * (i - 20)))  # the new session's clock
    assert st.elapsed_s == 50.0
    assert list(st.train.column("elapsed_s"))[-6:] == [40.0, 42.0, 44.0, 46.0, 48.0, 50.0]
    assert st.eta_s() == pytest.approx(2.0 * 15)


def test_elapsed_time_of_a_resumed_run_read_from_the_database_goes_on():
    from finetune_studio.studio.state.run import RunState

    st = RunState()
    rows = [{"step": i, "loss": 1.0, "elapsed_s": 3.0 * i} for i in range(1, 11)]
    rows += [{"step": i, "loss": 1.0, "elapsed_s": 3.0 * (i - 10)} for i in range(11, 14)]
    st.load_history(rows, [])
    assert st.elapsed_s == 39.0
    st.apply(_step(14, 12.0))  # the followed run's next step
    assert st.elapsed_s == 42.0


def test_stop_while_starting_says_stopped_not_failed(qtbot, window):
    """Stop pressed while the engine still loads (no handler for the stop yet: SIGTERM ends it) is a stop."""
    win = window
    win.controller.engine_argv = fake_engine("""
        emit(type="progress", stage="model", done=0, total=1, message="Loading the model")
        time.sleep(60)
    """)
    qtbot.waitUntil(lambda: win.setup_state.ready, timeout=15_000)
    win.setup_page.request_start()
    qtbot.waitUntil(lambda: win.run_state.progress is not None, timeout=30_000)
    assert win.train_page.status.text() == "Starting…"
    with qtbot.waitSignal(win.controller.run_ended, timeout=30_000):
        qtbot.mouseClick(win.train_page.stop_button, Qt.MouseButton.LeftButton)
    page = win.train_page
    assert win.run_state.status == "stopped" and page.status.text() == "Stopped"
    assert "Stopped before training began" in page.message.text()
    assert "signal" not in page.message.text() and "failed" not in page.message.text().lower()


def test_a_reopened_run_shows_its_log_and_a_device_sized_memory_bar(qtbot, make_window, tmp_path):
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory.estimate import GIB, ModelShape
    from finetune_studio.core.protocol.memory_report import memory_report

    config = TrainConfig(dataset="demo.jsonl")
    report = memory_report(
        ModelShape.for_model_spec("default"), config, DeviceInfo("cpu", "CPU", 16 * GIB, 12 * GIB, True)
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "engine.log").write_text("".join(f"line {i}\n" for i in range(1, 31)), encoding="utf-8")
    store = Store()
    run_id = store.create_run(config.to_dict(), name="earlier", run_dir=str(run_dir))
    store.update_run(
        run_id, status="completed", memory_budget_bytes=report.total_bytes, memory_estimate=report.to_json(), step=5
    )
    win = make_window({})
    assert win.controller.open_run(run_id)
    text = win.train_page.log_view.toPlainText()
    assert "line 1\n" in text + "\n" and text.rstrip().endswith("line 30")
    est = win.run_memory.estimate
    assert est.total_bytes == report.total_bytes
    assert est.device_total_bytes == report.device_bytes > report.total_bytes  # the bar's scale is the device
    assert "free at the start" in win.train_page.memory_label.text()  # which device figure it is


def test_a_followed_runs_log_grows_from_its_file(qtbot, make_window, tmp_path):
    from finetune_studio.core.store import process_start

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "engine.log"
    log.write_text("loading\n", encoding="utf-8")
    store = Store()
    run_id = store.create_run({"model": "m", "max_steps": 10}, name="background", run_dir=str(run_dir))
    store.update_run(run_id, status="running", pid=os.getpid(), pid_start=process_start(os.getpid()))
    win = make_window({})
    qtbot.waitUntil(lambda: win.run_state.following, timeout=10_000)  # found and followed at start
    assert win.train_page.log_view.toPlainText() == "loading"
    with log.open("a", encoding="utf-8") as fh:
        fh.write("step 1 done\nhalf a li")
    qtbot.waitUntil(lambda: "step 1 done" in win.train_page.log_view.toPlainText(), timeout=5000)
    assert "half a li" not in win.train_page.log_view.toPlainText()
    store.update_run(run_id, status="completed")
    qtbot.waitUntil(lambda: not win.run_state.following, timeout=5000)
