"""Fixtures shared by the studio tests: main windows that clean up after themselves, and the train page's window."""

from __future__ import annotations

import pytest
from studio_support import fake_engine, write_sft_jsonl


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


@pytest.fixture
def window(make_window, tiny_model_dir, tmp_path):
    """A shown MainWindow set up to train the tiny model on 24 SFT rows (50 steps), its data check a fake engine;
    start a run in it with ``studio_support.start_with``. Modules whose tests need another set-up define their own
    ``window``."""
    data = write_sft_jsonl(tmp_path / "train.jsonl")
    win = make_window({"model": str(tiny_model_dir), "dataset": data, "max_steps": 50})
    win.setup_page.dataset_panel.job.command = fake_engine("print(json.dumps({'kind': 'sft', 'rows': 24}))")
    win.show()
    return win
