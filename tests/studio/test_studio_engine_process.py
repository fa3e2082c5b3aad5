"""EngineProcess against tiny scripted children: the protocol's happy path and its error paths."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from finetune_studio.core.protocol.events import Eval, Failed, Finished, Started, Step
from finetune_studio.core.store import pid_alive
from finetune_studio.studio.services.engine_process import EngineProcess, Outcome

PRELUDE = textwrap.dedent("""
    import json, os, sys, time, signal
    def emit(**kw):
        kw.setdefault("v", 1)
        sys.stdout.write(json.dumps(kw) + "\\n"); sys.stdout.flush()
    def started(total=3):
        emit(type="started", run_id="r1", run_dir="/tmp/r1", total_steps=total)
    def step(i, total=3):
        emit(type="step", step=i, total_steps=total, loss=2.0 / i, lr=1e-4, grad_norm=0.5, tokens_per_s=100.0,
             memory_used_bytes=1000, memory_peak_bytes=2000, elapsed_s=0.01 * i)
""")


def fake(body: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(body)]


def run_child(qtbot, argv, timeout=20_000) -> tuple[EngineProcess, list, list, Outcome]:
    proc = EngineProcess()
    events, logs = [], []
    proc.event.connect(events.append)
    proc.log.connect(lambda level, text: logs.append((level, text)))
    with qtbot.waitSignal(proc.ended, timeout=timeout) as blocker:
        proc.start(argv)
    assert not proc.running
    return proc, events, logs, blocker.args[0]


def test_completed_run_gives_typed_events(qtbot):
    _, events, logs, outcome = run_child(
        qtbot,
        fake("""
        started()
        for i in (1, 2, 3):
            step(i)
        emit(type="eval", step=3, eval_loss=0.9)
        sys.stderr.write("a log line\\n")
        emit(type="finished", run_id="r1", status="completed", step=3, final_loss=0.66)
    """),
    )
    assert [type(e) for e in events] == [Started, Step, Step, Step, Eval, Finished]
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2, 3]
    assert outcome == Outcome("completed", "", "", 0, "r1")
    assert ("stderr", "a log line") in logs


def test_partial_lines_are_joined(qtbot):
    _, events, _, outcome = run_child(
        qtbot,
        fake("""
        line = json.dumps(dict(v=1, type="started", run_id="r1", run_dir="d", total_steps=1)) + "\\n"
        for ch in line:
            sys.stdout.write(ch); sys.stdout.flush()
        emit(type="finished", run_id="r1", status="completed", step=1)
    """),
    )
    assert isinstance(events[0], Started) and events[0].run_id == "r1"
    assert outcome.status == "completed"


def test_crash_mid_run_keeps_what_came_and_explains(qtbot):
    _, events, _, outcome = run_child(
        qtbot,
        fake("""
        started(); step(1)
        sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: boom\\n"); sys.stderr.flush()
        os._exit(3)
    """),
    )
    assert [type(e) for e in events] == [Started, Step]
    assert outcome.status == "crashed" and outcome.exit_code == 3 and outcome.run_id == "r1"
    assert "unexpectedly" in outcome.message and "RuntimeError: boom" in outcome.message


def test_killed_by_signal_mentions_memory(qtbot):
    _, _, _, outcome = run_child(
        qtbot,
        fake("""
        started(); os.kill(os.getpid(), signal.SIGKILL)
    """),
    )
    assert outcome.status == "crashed"
    assert "signal 9" in outcome.message and "memory" in outcome.message


def test_malformed_line_is_reported_and_reading_goes_on(qtbot):
    proc, events, logs, outcome = run_child(
        qtbot,
        fake("""
        started()
        print("this is not json", flush=True)
        print('{"v": 1, "type": "step"}', flush=True)
        step(1)
        emit(type="finished", run_id="r1", status="completed", step=1)
    """),
    )
    assert proc.protocol_errors == 2
    assert [type(e) for e in events] == [Started, Step, Finished]
    assert sum(1 for level, text in logs if level == "warning" and "could not read" in text) == 2
    assert outcome.status == "completed"


def test_out_of_memory_failure_keeps_the_engines_message(qtbot):
    _, events, _, outcome = run_child(
        qtbot,
        fake("""
        started(); step(1)
        emit(type="failed", run_id="r1", kind="oom", message="Out of GPU memory at step 2: lower batch_size to 2.")
        sys.exit(1)
    """),
    )
    assert isinstance(events[-1], Failed)
    assert outcome.status == "failed" and outcome.kind == "oom"
    assert outcome.message == "Out of GPU memory at step 2: lower batch_size to 2."
    assert not outcome.ok


def test_engine_that_exits_without_events(qtbot):
    _, events, _, outcome = run_child(
        qtbot,
        fake("""
        sys.stderr.write("ModuleNotFoundError: No module named 'engine.cli.commands'\\n"); sys.exit(1)
    """),
    )
    assert events == []
    assert outcome.status == "crashed" and outcome.exit_code == 1
    assert "before it reported anything" in outcome.message and "engine.cli.commands" in outcome.message


def test_engine_that_never_starts(qtbot, tmp_path):
    _, events, _, outcome = run_child(qtbot, [str(tmp_path / "no-such-engine")])
    assert events == []
    assert outcome.status == "not_started"
    assert "could not be started" in outcome.message and "no-such-engine" in outcome.message


def test_stop_sends_sigterm_and_child_finishes_cleanly(qtbot):
    proc = EngineProcess()
    with qtbot.waitSignal(proc.started_run, timeout=20_000):
        proc.start(
            fake("""
            def on_term(*_):
                emit(type="checkpoint", step=1, path="/tmp/ck")
                emit(type="finished", run_id="r1", status="stopped", step=1)
                sys.exit(0)
            signal.signal(signal.SIGTERM, on_term)
            started(total=1000)
            for i in range(1, 1000):
                step(i, 1000); time.sleep(0.05)
        """)
        )
    with qtbot.waitSignal(proc.ended, timeout=20_000) as blocker:
        proc.stop()
    assert blocker.args[0].status == "stopped" and blocker.args[0].exit_code == 0


def test_detach_leaves_the_child_running(qtbot, tmp_path):
    pidfile = tmp_path / "pid"
    proc = EngineProcess()
    with qtbot.waitSignal(proc.started_run, timeout=20_000):
        proc.start(
            fake(f"""
            open({str(pidfile)!r}, "w").write(str(os.getpid()))
            started(total=1000)
            for i in range(1, 600):
                try:
                    step(i, 1000)
                except (BrokenPipeError, OSError):
                    pass
                time.sleep(0.05)
        """)
        )
    with qtbot.waitSignal(proc.ended, timeout=20_000) as blocker:
        proc.detach()
    assert blocker.args[0].status == "detached"
    pid = int(pidfile.read_text())
    try:
        time.sleep(0.3)
        assert pid_alive(pid), "the child should outlive the relay"
        assert os.getpgid(pid) != os.getpgid(0), "the child runs in its own session"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_starting_twice_is_refused(qtbot):
    proc = EngineProcess()
    proc.start(fake("time.sleep(5)"))
    try:
        with pytest.raises(RuntimeError):
            proc.start(fake("pass"))
    finally:
        with qtbot.waitSignal(proc.ended, timeout=20_000):
            proc.kill()


def test_the_job_wrapper_reads_the_pairs_commands_typed_answers(qtbot, tmp_path):
    """``engine pairs ... --json`` answers through EngineJob like every other engine command: a typed event on
    ``done``, a ``failed`` event's message on ``failed``."""
    import json

    from PySide6.QtWidgets import QWidget

    from finetune_studio.core.protocol.pairs_report import PairsImported
    from finetune_studio.studio.services.jobs import EngineJob

    owner = QWidget()
    qtbot.addWidget(owner)
    job = EngineJob(owner)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"{i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(2))
    )
    with qtbot.waitSignal(job.done, timeout=60_000) as done:
        job.run("pairs", "import", str(pairs), "--json")
    assert isinstance(done.args[0], PairsImported) and done.args[0].added == 2
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    with qtbot.waitSignal(job.failed, timeout=60_000) as failed:
        job.run("pairs", "import", str(sft), "--json")
    assert "not preference pairs" in failed.args[0]
