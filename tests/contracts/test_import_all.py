"""Every module of finetune_studio imports, each room walked with ``pkgutil.walk_packages`` in a fresh interpreter.

A module that cannot be imported (a name left behind by a move, a cycle closed at import time, a folder without
``__init__.py`` that the walk would skip) fails here, not in the one command that happens to load it. The walk runs
in a child process so that what the imports load (torch, Qt, environment variables) stays out of the test session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

from finetune_studio.core.paths import python_argv

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("core", "engine", "kernels", "studio")
# Written against triton's language: importable only where triton is installed.
NEEDS_TRITON = ("finetune_studio.kernels.triton_dora_norm", "finetune_studio.kernels.triton_linear_logprobs")

WALK = """
import importlib, json, pkgutil, sys, traceback
rooms, skip = json.loads(sys.argv[1])
walked, failed = [], {}
def record(name):
    failed[name] = traceback.format_exc(limit=-3)
for room in rooms:
    name = "finetune_studio." + room
    walked.append(name)
    try:
        package = importlib.import_module(name)
    except Exception:
        record(name)
        continue
    for info in pkgutil.walk_packages(package.__path__, name + ".", onerror=record):
        walked.append(info.name)
        if info.name in skip:
            continue
        try:
            importlib.import_module(info.name)
        except Exception:
            record(info.name)
print(json.dumps({"walked": walked, "failed": failed}))
"""


def _module_names_on_disk() -> set[str]:
    """Every ``.py`` file under the rooms, named as the installed package names it."""
    names = set()
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            names.add(".".join(("finetune_studio", *parts)))
    return names


def test_every_module_imports(tmp_path):
    skip = [] if importlib.util.find_spec("triton") else list(NEEDS_TRITON)
    child = subprocess.run(
        [*python_argv(), "-c", WALK, json.dumps([ROOMS, skip])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, "\n".join(f"{name}:\n{error}" for name, error in result["failed"].items())
    # The walk saw every file: a folder without __init__.py, or one the walk could not enter, would be missing.
    missing = _module_names_on_disk() - set(result["walked"])
    assert not missing, f"modules the walk did not reach: {sorted(missing)}"
