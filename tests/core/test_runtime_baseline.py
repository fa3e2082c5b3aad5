"""The runtime term of a CPU estimate is one figure: the engine process's baseline, measured once per machine and
versions and kept in the data directory; the app's panel, ``engine estimate`` and the run's own estimate use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine_helpers import Recorder, tiny_config, write_sft

from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory import runtime_baseline as baseline
from finetune_studio.core.protocol.memory_report import MemoryReport

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
CPU = DeviceInfo("cpu", "cpu", 64 * GIB, 64 * GIB, True)


def _engine(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETUNE_STUDIO_HOME": str(home)}
    argv = [sys.executable, "-P", "-m", "finetune_studio.engine", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_the_panel_the_cli_and_the_run_use_the_same_runtime_term(tiny_model_dir, tmp_path, studio_home):
    from finetune_studio.core.store import Store
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter
    from finetune_studio.studio.services.estimate import estimate as panel_estimate

    data = write_sft(tmp_path / "sft.jsonl", n=12)
    config = tiny_config(tiny_model_dir, data, max_steps=1, batch_size=2, validation_fraction=0.0, eval_every=0)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config.to_dict()), encoding="utf-8")

    before = panel_estimate(config, None, CPU)  # nothing measured on this machine yet: the stated default
    assert before.parts["runtime (default until measured)"] == baseline.DEFAULT_BASELINE_BYTES

    done = _engine("estimate", str(path), "--json", "--device", "cpu", home=studio_home)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = MemoryReport.from_json(done.stdout.strip().splitlines()[-1]).terms["runtime_overhead"]
    assert cli == baseline.kept_baseline()  # the estimating process measured itself after its imports and kept it
    assert 100 * 2**20 < cli < 4 * GIB
    table = _engine("estimate", str(path), "--device", "cpu", home=studio_home)
    assert table.returncode == 0 and f"runtime:     {cli / 2**20:.0f} MiB" in table.stdout

    after = panel_estimate(config, None, CPU)
    assert after.parts["runtime (measured)"] == cli

    run = train_run(config, reporter=Reporter(extra=Recorder()))  # in this process, whose own size differs
    stored = MemoryReport.from_json(Store().get_run(run.run_id)["memory_estimate"])
    assert stored.terms["runtime_overhead"] == cli


def test_a_figure_kept_for_other_versions_or_another_machine_is_not_used(studio_home):
    baseline.keep_baseline(700 * 2**20)
    assert baseline.kept_baseline() == 700 * 2**20 and baseline.runtime_baseline().measured
    record = json.loads(baseline.baseline_path().read_text(encoding="utf-8"))
    for key, value in (("torch", "0.0.1"), ("machine", "elsewhere Linux x86_64"), ("python", "2.7.18")):
        changed = {**record, "versions": {**record["versions"], key: value}}
        baseline.baseline_path().write_text(json.dumps(changed), encoding="utf-8")
        assert baseline.kept_baseline() is None, key
        kept = baseline.runtime_baseline()
        assert kept.bytes == baseline.DEFAULT_BASELINE_BYTES and not kept.measured
    baseline.baseline_path().write_text("{not json", encoding="utf-8")
    assert baseline.kept_baseline() is None


def test_the_app_reads_the_kept_figure_without_importing_the_ml_stack(studio_home):
    baseline.keep_baseline(640 * 2**20)
    code = (
        "import sys\n"
        "from finetune_studio.core.devices import DeviceInfo\n"
        "from finetune_studio.studio.services.estimate import engine_process\n"
        "device, label = engine_process(DeviceInfo('cpu', 'cpu', 1 << 34, 1 << 34, True))\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "print(device.process_bytes, label, bad)\n"
    )
    env = {**os.environ, "FINETUNE_STUDIO_HOME": str(studio_home), "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == f"{640 * 2**20} runtime (measured) []"
