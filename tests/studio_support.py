"""Helpers shared by the studio tests (no tests here): fake engines, windows that clean up after themselves."""

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


@pytest.fixture
def make_window(qtbot):
    """Build MainWindows that stop their children and background jobs when the test ends."""
    from PySide6.QtCore import QProcess

    from finetune_studio.studio.main_window import MainWindow
    from finetune_studio.studio.services.jobs import pending_orphans
    from finetune_studio.studio.state.settings import Settings

    windows = []

    def make(config: dict | None = None, **kw):
        settings = Settings()
        if config is not None:
            settings.set("last_config", config)
        win = MainWindow(settings, **kw)
        windows.append(win)
        return win

    yield make
    for win in windows:
        win.shutdown()
        if win.controller.proc.running:
            win.controller.proc.kill()

        def children_gone(win=win) -> bool:
            return not win.controller.proc.running and all(
                p.state() == QProcess.ProcessState.NotRunning for p in win.findChildren(QProcess)
            )

        qtbot.waitUntil(children_gone, timeout=30_000)
        win.close()
        win.deleteLater()
    qtbot.waitUntil(lambda: pending_orphans() == 0, timeout=30_000)
