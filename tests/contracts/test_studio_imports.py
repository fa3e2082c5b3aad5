"""The GUI process never loads the ML stack: checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = (
    "torch",
    "transformers",
    "bitsandbytes",
    "peft",
    "triton",
    "kernels",
    "datasets",
    "finetune_studio.engine",
    "finetune_studio.kernels",
)


def test_studio_imports_no_ml_stack(studio_home, tiny_model_dir):
    # A local model folder: the window reads its shape itself instead of asking the engine.
    (studio_home / "studio-settings.json").write_text(json.dumps({"last_config": {"model": str(tiny_model_dir)}}))
    code = (
        "import sys, json\n"
        "import finetune_studio.studio.__main__, finetune_studio.studio.app, finetune_studio.studio.main_window\n"
        "from PySide6.QtWidgets import QApplication\n"
        "from finetune_studio.studio.app import create_app\n"
        "from finetune_studio.studio.main_window import MainWindow\n"
        "app = create_app([])\n"
        "win = MainWindow(); win.show(); app.processEvents()\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden))))\n"
        "win.close()\n"
    )
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", FINETUNE_STUDIO_HOME=str(studio_home))
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the GUI imported {loaded}"


def test_qt_binding_keeps_none_alive():
    """PySide6 6.12.0 on Python 3.11 drops a reference to None on every void call and crashes the app."""
    from finetune_studio.studio import compat

    assert compat.binding_is_sound(), compat.problem()
