"""``python -m finetune_studio.engine devices [--json]``: the devices a run can use, as torch sees them.

Answers one :class:`core.protocol.device_report.DeviceReport`: every CUDA GPU torch can use (``CUDA_VISIBLE_DEVICES``
applies), with its total and free memory and bfloat16 support, an Apple GPU (MPS), and the CPU last. With
``--json`` it is one event line on stdout (what the studio reads), else a table.
"""

from __future__ import annotations

import argparse

from finetune_studio.core.devices import DeviceInfo, cpu_device, detect_devices
from finetune_studio.core.protocol.device_report import DeviceReport


def add_parser(sub) -> None:
    p = sub.add_parser("devices", help="the GPUs (and the CPU) a run can use, as torch sees them")
    p.add_argument("--json", action="store_true", help="print one device_report event (JSON line)")


def report() -> DeviceReport:
    import torch

    devices = [_cuda_device(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found = [d for d in detect_devices() if d.kind == "mps"]
        devices += found or [DeviceInfo("mps", "Apple GPU (MPS)", 0, 0, True)]
    devices.append(cpu_device())
    return DeviceReport(
        devices=tuple(devices),
        source="torch",
        torch_version=str(torch.__version__),
        cuda_version=str(torch.version.cuda or ""),
    )


def _cuda_device(index: int) -> DeviceInfo:
    import torch

    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    bf16 = torch.cuda.get_device_capability(index) >= (8, 0)
    return DeviceInfo("cuda", props.name, int(total), int(free), bf16, index)


def format_report(r: DeviceReport) -> str:
    gib = 1024**3
    lines = [f"torch {r.torch_version}" + (f", CUDA {r.cuda_version}" if r.cuda_version else ", no CUDA build")]
    for d in r.devices:
        where = f"cuda:{d.index}" if d.kind == "cuda" else d.kind
        lines.append(f"  {where:<8} {d.name}: {d.total_bytes / gib:.1f} GiB, {d.free_bytes / gib:.1f} GiB free")
    lines.append(f"processes: up to {r.max_processes} (train CONFIG --nproc N, one per GPU)")
    return "\n".join(lines)


def cmd_devices(args: argparse.Namespace, stream) -> int:
    """``stream``: the real stdout (the CLI points fd 1 at stderr so that libraries cannot corrupt it)."""
    r = report()
    stream.write((r.to_json() if args.json else format_report(r)) + "\n")
    return 0
