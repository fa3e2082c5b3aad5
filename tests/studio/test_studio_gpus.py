"""Several GPUs in the app: the engine's device report, the set-up page's Processes / Parallelism controls, the
per-GPU memory budget and the `train --nproc N` command the app starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from studio_support import IGNORE_OFFSCREEN, fake_engine, write_sft_jsonl

from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import ModelShape
from finetune_studio.core.protocol.dataset_report import DatasetReport
from finetune_studio.core.protocol.device_report import DeviceReport
from finetune_studio.core.protocol.events import ProtocolError, parse_event
from finetune_studio.core.protocol.memory_report import memory_report

pytestmark = IGNORE_OFFSCREEN

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
CPU = DeviceInfo("cpu", "CPU (x86_64, 16 cores)", 64 * GIB, 60 * GIB, True)


def gpus(n: int, free_gib: float = 70) -> DeviceReport:
    cards = tuple(DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 80 * GIB, int(free_gib * GIB), True, i) for i in range(n))
    return DeviceReport(devices=(*cards, CPU), torch_version="2.6.0", cuda_version="12.4")


def test_device_report_round_trips_as_an_event():
    report = gpus(2)
    line = report.to_json()
    assert json.loads(line)["type"] == "device_report" and json.loads(line)["v"] == 1
    back = parse_event(line)
    assert back == report and isinstance(back, DeviceReport) and DeviceReport.from_json(line) == report
    assert back.max_processes == 2 and back.several_gpus and back.best == report.devices[0]
    assert [d.index for d in back.gpus] == [0, 1] and back.devices[-1].kind == "cpu"
    alone = DeviceReport(devices=(CPU,))
    assert alone.max_processes == 1 and not alone.several_gpus and parse_event(alone.to_json()) == alone
    body = json.loads(line)
    body["devices"][0]["kind"] = "tpu"
    with pytest.raises(ProtocolError, match="device_report"):
        parse_event(json.dumps(body))
    with pytest.raises(ProtocolError, match="device_report"):
        parse_event(json.dumps({**body, "devices": "two"}))


def test_devices_command_reports_what_torch_can_use():
    """The real engine command in a child process: no GPU visible, so one process (the CPU last)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "devices", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = out.stdout.splitlines()  # one event line, nothing else on stdout
    report = DeviceReport.from_json(line)
    assert report.gpus == () and report.max_processes == 1 and not report.several_gpus
    assert report.devices[-1].kind == "cpu" and report.devices[-1].total_bytes > 0
    assert report.source == "torch" and report.torch_version


@pytest.fixture
def window(make_window, tiny_model_dir, tmp_path):
    data = write_sft_jsonl(tmp_path / "train.jsonl")
    win = make_window({"model": str(tiny_model_dir), "dataset": data, "max_steps": 5, "batch_size": 4})
    report = DatasetReport(file=data, format="messages", kind="sft", rows=24).to_json()
    win.setup_page.dataset_panel.job.command = fake_engine(f"print({report!r})")
    win.show()
    return win


def test_processes_are_offered_with_two_gpus_and_hidden_with_fewer(qtbot, window):
    page, st = window.setup_page, window.setup_state
    assert not page.gpus_box.isVisible() and st.processes == 1  # this machine: no report, no controls
    page.set_device_report(gpus(2))
    assert page.gpus_box.isVisible()
    assert (page.processes.minimum(), page.processes.maximum(), page.processes.value()) == (1, 2, 1)
    assert not page.parallelism.isEnabled()  # one process: nothing to choose yet
    page.processes.setValue(2)
    assert st.processes == 2 and page.parallelism.isEnabled()
    page.parallelism.buttons["fsdp"].click()
    assert st.config.parallelism == "fsdp"
    for fewer in (gpus(1), gpus(0)):
        page.set_device_report(fewer)
        assert not page.gpus_box.isVisible() and st.processes == 1
    page.set_device_report(gpus(4))
    assert page.gpus_box.isVisible() and page.processes.maximum() == 4 and st.processes == 1
    # the global batch must split over the processes: said next to batch_size, Start held back
    page.processes.setValue(3)
    assert "multiple of 3" in st.errors["batch_size"] and not page.start_button.isEnabled()
    page.processes.setValue(4)
    assert "batch_size" not in st.errors


def test_memory_budget_is_per_gpu_for_the_chosen_parallelism(qtbot, window):
    page, st, memory = window.setup_page, window.setup_state, window.setup_memory
    qtbot.waitUntil(lambda: st.ready and st.model_info is not None, timeout=15_000)
    page.set_device_report(gpus(2, free_gib=30))
    shape = ModelShape.from_model_dir(st.model_info.path)

    def shown() -> int:
        page._update_estimate()
        return memory.estimate.total_bytes

    shown()
    assert "×" not in memory.estimate.device_name  # one process: this machine's device, as before
    page.processes.setValue(2)
    ddp = shown()
    assert memory.estimate.device_name == "NVIDIA H100 80GB HBM3 × 2, per GPU (DDP)"
    assert memory.estimate.device_total_bytes == 30 * GIB  # one GPU's free memory
    assert ddp == memory_report(shape, st.config, gpus(2, 30).gpus[0], world_size=2).total_bytes
    page.parallelism.buttons["fsdp"].click()
    fsdp = shown()
    assert fsdp == memory_report(shape, st.config, gpus(2, 30).gpus[0], world_size=2).total_bytes
    assert st.config.parallelism == "fsdp" and "FSDP" in memory.estimate.device_name
    # two processes each train half of the global batch of 4: less than one process on that GPU; FSDP also
    # shards the optimizer states
    one = memory_report(shape, st.config.replace(parallelism="ddp"), gpus(2, 30).gpus[0]).total_bytes
    assert fsdp < ddp < one
    page.processes.setValue(1)
    shown()
    assert "×" not in memory.estimate.device_name


STARTED = """
emit(type="started", run_id="fake-run", run_dir="/tmp/fake", total_steps=5, world_size=2)
emit(type="finished", run_id="fake-run", status="completed", step=5)
"""


def test_start_launches_one_process_per_chosen_gpu(qtbot, window):
    calls: list = []
    fake = fake_engine(textwrap.dedent(STARTED))
    window.controller.engine_argv = lambda *args: (calls.append(list(args)), fake(*args))[1]
    page, st = window.setup_page, window.setup_state
    qtbot.waitUntil(lambda: st.ready, timeout=15_000)
    page.set_device_report(gpus(2))
    page.processes.setValue(2)
    page.parallelism.buttons["fsdp"].click()
    with qtbot.waitSignal(window.controller.run_ended, timeout=30_000):
        page.request_start()
    (args,) = calls
    assert args[0] == "train" and args[2:] == ["--nproc", "2"]
    saved = json.loads(Path(args[1]).read_text(encoding="utf-8"))
    assert saved["parallelism"] == "fsdp" and saved["batch_size"] == 4
    # fewer than two GPUs: the plain one-process command, as before
    page.set_device_report(gpus(1))
    qtbot.waitUntil(lambda: not window.controller.busy, timeout=10_000)
    with qtbot.waitSignal(window.controller.run_ended, timeout=30_000):
        page.request_start()
    assert calls[1][0] == "train" and len(calls[1]) == 2
