"""Helpers shared by the studio tests (no tests and no fixtures here: those are in tests/studio/conftest.py): fake
engines, a run started through the app with one."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

# The offscreen platform says this whenever a window with size limits is shown; it is not the app's warning.
IGNORE_OFFSCREEN = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")

EMIT = textwrap.dedent("""
    import json, os, sys, time, signal
    def emit(**kw):
        kw.setdefault("v", 1)
        sys.stdout.write(json.dumps(kw) + "\\n"); sys.stdout.flush()
""")


def fake_engine(body: str):
    """An ``engine_argv``-style factory: whatever the arguments, run ``body`` (with ``emit``) instead."""

    def argv(*_args: str) -> list[str]:
        return [sys.executable, "-P", "-c", EMIT + textwrap.dedent(body)]

    return argv


def fake_json(obj: dict):
    """A fake engine that prints one JSON object (for ``data inspect``)."""
    return fake_engine(f"print(json.dumps({obj!r}))")


def write_sft_jsonl(path, rows: int = 24) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} plus {i}?"},
                            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                        ]
                    }
                )
                + "\n"
            )
    return str(path)


# A fake engine's run: ``started()`` and ``step(i)`` emit the engine's events (see ``start_with``).
STEPS = """
def started(total=50):
    emit(type="started", run_id="fake-run", run_dir="/tmp/fake", total_steps=total, memory_budget_bytes=3 << 30,
         memory_total_bytes=16 << 30)
def step(i, total=50):
    emit(type="step", step=i, total_steps=total, loss=3.0 / i, lr=1e-4, grad_norm=0.7, tokens_per_s=900.0,
         memory_used_bytes=2 << 30, memory_peak_bytes=(2 << 30) + i, elapsed_s=0.1 * i)
"""


def start_with(qtbot, win, body: str):
    """Start a run in ``win`` (a MainWindow) with a fake engine that runs ``body`` (with :data:`STEPS`); wait for it
    to end and return its outcome."""
    win.controller.engine_argv = fake_engine(STEPS + textwrap.dedent(body))
    qtbot.waitUntil(lambda: win.setup_state.ready, timeout=15_000)
    with qtbot.waitSignal(win.controller.run_ended, timeout=30_000) as ended:
        win.setup_page.request_start()
    return ended.args[0]
