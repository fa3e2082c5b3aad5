"""Take the README's screenshots from the real app: set-up page, then a real training run.

    xvfb-run -a -s "-screen 0 1600x1000x24" env QT_QPA_PLATFORM=xcb \\
        python docs/screenshots/take_screenshots.py [--steps 40] [--home DIR]

The set-up page shows the bundled default model and the demo SFT dataset. The
training run is real; with ``--train-model tiny`` (the default) it trains the
tests' tiny Llama, built first in a child process (the GUI never imports torch),
so that a CPU-only machine gets a long curve in a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent


def build_tiny_model() -> str:
    import subprocess

    folder = Path(tempfile.mkdtemp(prefix="tiny-model-"))
    code = f"from tiny_model import build_tiny_model_dir; build_tiny_model_dir({str(folder)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", check=True, capture_output=True)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="steps to train before the training screenshot")
    parser.add_argument("--home", default="", help="studio data folder (default: a temporary one)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--train-model", default="tiny", help="'tiny', 'same', or a model folder")
    args = parser.parse_args()
    train_model = args.model if args.train_model == "same" else args.train_model
    if train_model == "tiny":
        train_model = build_tiny_model()
    os.environ["FINETUNE_STUDIO_HOME"] = args.home or tempfile.mkdtemp(prefix="studio-shots-")
    sys.modules.setdefault("pandas", None)  # as studio.__main__ does

    from PySide6.QtCore import QTimer

    from finetune_studio.studio.app import create_app
    from finetune_studio.studio.main_window import MainWindow
    from finetune_studio.studio.state.settings import Settings

    app = create_app([])
    settings = Settings()
    settings.set(
        "last_config",
        {
            "model": args.model,
            "dataset": str(ROOT / "resources" / "datasets" / "demo_sft.jsonl"),
            "method": "lora",
            "objective": "sft",
            "max_steps": 200,
            "batch_size": 2,
            "max_length": 256,
            "learning_rate": 3e-4,
            "lora_rank": 16,
            "lora_alpha": 32,
            "eval_every": 10,
            "checkpoint_every": 0,
            "warmup_steps": 5,
            "run_name": "SmolLM2 JSON extraction",
        },
    )
    win = MainWindow(settings)
    win.resize(1440, 900)
    win.show()
    started = time.monotonic()
    phase = {"name": "setup"}

    def tick() -> None:
        st, run = win.setup_state, win.run_state
        waited = time.monotonic() - started
        if phase["name"] == "setup":
            if (st.model_info is not None and st.dataset_info is not None) or waited > 600:
                win.grab().save(str(OUT / "setup.png"))
                print("saved setup.png", flush=True)
                phase["name"] = "train"
                if train_model != args.model:
                    st.set("model", train_model)
                    st.set("run_name", "Demo SFT on the tiny test model")
                    st.set("max_steps", "300")
                win.setup_page.request_start()
        elif phase["name"] == "train":
            if not st.ready and run.status == "idle":
                win.setup_page.request_start()  # the model's facts were still loading
            elif (run.step >= args.steps and len(run.eval) >= 3) or run.status in ("completed", "failed"):
                win.grab().save(str(OUT / "training.png"))
                print(f"saved training.png at step {run.step} ({run.status})", flush=True)
                phase["name"] = "stopping"
                if run.active:
                    win.controller.run_ended.connect(lambda _o: finish())
                    win.stop_run()
                else:
                    finish()

    def finish() -> None:
        win.shutdown()
        win.close_choice = "stop"
        app.quit()

    timer = QTimer(interval=500)
    timer.timeout.connect(tick)
    timer.start()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
