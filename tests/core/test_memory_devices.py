"""Device detection without torch: nvidia-smi parsing, the CPU fallback, caching."""

from __future__ import annotations

import finetune_studio.core.devices as devices
from finetune_studio.core.devices import DeviceInfo, cpu_device, detect_devices, parse_nvidia_smi


def test_parse_nvidia_smi_lines():
    text = "NVIDIA GeForce RTX 3060, 12288, 11800, 8.6\nTesla T4, 15360, 15000, 7.5\n"
    gpus = parse_nvidia_smi(text)
    assert gpus == [
        DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", 12288 * 2**20, 11800 * 2**20, True, 0),
        DeviceInfo("cuda", "Tesla T4", 15360 * 2**20, 15000 * 2**20, False, 1),
    ]
    # an old driver without the compute_cap column: bf16 guessed from the name
    assert [g.bf16_supported for g in parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 81920, 80000\nTesla V100, 1, 1")] == [
        True,
        False,
    ]


def test_cpu_device_reports_system_memory():
    cpu = cpu_device()
    assert cpu.kind == "cpu" and cpu.total_bytes > 2**28 and 0 < cpu.free_bytes <= cpu.total_bytes
    assert cpu.available_bytes == cpu.free_bytes


def test_detect_devices_falls_back_to_cpu_and_caches(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # no nvidia-smi
    found = detect_devices(refresh=True)
    try:
        assert found[-1].kind == "cpu" and all(d.kind != "cuda" for d in found)
        assert detect_devices() is found
    finally:
        detect_devices(refresh=True)


def test_broken_nvidia_smi_is_ignored(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setattr(devices.shutil, "which", lambda name: str(fake))
    try:
        assert [d.kind for d in detect_devices(refresh=True)][-1] == "cpu"
        assert not any(d.kind == "cuda" for d in detect_devices())
    finally:
        detect_devices(refresh=True)
