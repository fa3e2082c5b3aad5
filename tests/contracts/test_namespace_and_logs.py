"""The project's code lives under one installed namespace, and library noise stays out of the run log."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

from engine_helpers import tiny_config, write_sft

import finetune_studio.kernels
from finetune_studio.core.paths import python_argv

ROOT = Path(__file__).resolve().parents[2]
WHERE_IS_KERNELS = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"


def _outside_the_project(origin: str | None) -> bool:
    return origin is None or not Path(origin).resolve().is_relative_to(ROOT)


def test_kernels_is_never_the_projects_code():
    """``import kernels`` is Hugging Face's package (or nothing), here and in the engine's processes."""
    assert Path(finetune_studio.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert _outside_the_project(getattr(importlib.util.find_spec("kernels"), "origin", None))
    # As the app starts the engine, with the checkout as working directory.
    child = subprocess.run([*python_argv(), "-c", WHERE_IS_KERNELS], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "None" or _outside_the_project(child.stdout.strip())
    # `python -m finetune_studio.engine` typed in the checkout: the entry point takes the checkout off sys.path.
    code = "from finetune_studio.core.paths import drop_checkout_from_path as d; d(); " + WHERE_IS_KERNELS
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "None" or _outside_the_project(child.stdout.strip())
    # Without that, the checkout's folder would answer: the guard above is what keeps it out.
    child = subprocess.run([sys.executable, "-c", WHERE_IS_KERNELS], cwd=ROOT, capture_output=True, text=True)
    assert Path(child.stdout.strip()).resolve() == ROOT / "kernels" / "__init__.py"


def test_library_records_go_to_the_full_log_only(tmp_path, capsys):
    from finetune_studio.engine import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup()
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("could not load a kernel")
        logging.getLogger("finetune_studio.engine.train.recipe").info("step one")
        logs.attach_run_dir(tmp_path)  # records so far are written to engine.log first
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library deprecation", FutureWarning, stacklevel=1)
        logging.getLogger("transformers").error("a library error")
        for handler in root.handlers:
            handler.flush()
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            if handler not in saved[0]:
                handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    run_log = capsys.readouterr().err
    full = (tmp_path / "engine.log").read_text()
    assert "step one" in run_log and "a library error" in run_log
    assert "could not load a kernel" not in run_log and "a library deprecation" not in run_log
    for text in ("could not load a kernel", "step one", "a library deprecation", "a library error"):
        assert text in full
    assert full.index("could not load a kernel") < full.index("a library deprecation")


def test_a_qlora_run_log_holds_no_library_noise(tiny_model_dir, tmp_path, studio_home):
    cfg = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=2, method="qlora")
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    out = subprocess.run(
        [*python_argv(), "-m", "finetune_studio.engine", "train", str(tmp_path / "c.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernels-community" not in out.stderr and "Warning" not in out.stderr, out.stderr
    named = [line.split()[3] for line in out.stderr.splitlines() if len(line.split()) > 3 and line[:2] == "20"]
    assert all(name.startswith("finetune_studio") for name in named), out.stderr
    (log,) = (studio_home / "runs").glob("*/engine.log")
    # With the project's kernels/ importable as `kernels`, bitsandbytes logged "cannot import name 'get_kernel'
    # from 'kernels' (.../kernels/__init__.py)" on every QLoRA run.
    assert "get_kernel" not in log.read_text()
