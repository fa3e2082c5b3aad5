"""``python -m finetune_studio.engine estimate CONFIG [--json]``: the run's memory budget before it starts.

Resolves the model (converting a GGUF once), counts its parameters for the chosen method on the meta device,
tokenises the dataset as training will (when the config names one) to find the longest batch, and prints
``core.protocol.memory_report.MemoryReport``: with ``--json`` one ``memory_report`` event on stdout (or a ``failed``
event, :class:`core.protocol.events.Failed`, saying why there is none), else a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.memory.runtime_baseline import runtime_baseline
from finetune_studio.core.protocol.events import Failed, FailureKind
from finetune_studio.core.protocol.memory_report import MemoryReport


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="the memory a run will need, fitted to its data, and whether it fits")
    p.add_argument("config", help="YAML or JSON config file")
    p.add_argument("--json", action="store_true", help="print the report as one memory_report event (JSON line)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="device to estimate for")


def estimate(config: TrainConfig, device_kind: str = "auto") -> MemoryReport:
    from finetune_studio.engine.models import LoadOptions, ModelError, pick_device, resolve_model
    from finetune_studio.engine.train import memory_budget

    # first, before anything is loaded: the kept process baseline (measured now when none is kept), the runtime
    # term the run and the app's panel use too, not this process's size after tokenising the data
    memory_budget.note_runtime_baseline()
    options = LoadOptions(allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    folder = resolve_model(config.model, options)
    device = memory_budget.device_info(pick_device() if device_kind == "auto" else device_kind)
    examples, total = _tokenized(config, folder, options) if config.dataset else (None, 0)
    report = memory_budget.run_report(folder, config, device, examples, total, config.trust_remote_code)
    if report is None:
        raise ModelError(f"cannot read the model's shape from {folder / 'config.json'}")
    return report


def _tokenized(config: TrainConfig, folder: Path, options) -> tuple[list, int]:
    """Every example of the dataset tokenised at max_length, as training does (both splits: an upper bound)."""
    from finetune_studio.engine.datasets import load_dataset
    from finetune_studio.engine.datasets.render import RenderError, tokenize_example
    from finetune_studio.engine.models import load_tokenizer

    data = load_dataset(config.dataset, config.dataset_mapping or None)
    tokenizer = load_tokenizer(str(folder), options)
    out = []
    for example in data.examples:
        try:
            out.append(tokenize_example(tokenizer, example, config.max_length, config.loss_on))
        except RenderError:
            continue
    return out, len(data.examples)


def cmd_estimate(args: argparse.Namespace, stream) -> int:
    """``stream``: the real stdout (the CLI points fd 1 at stderr so that libraries cannot corrupt it)."""
    from finetune_studio.engine.models import ModelError

    try:
        config = TrainConfig.load(args.config)
        if args.set:
            config = config.with_overrides(args.set)
        report = estimate(config, args.device)
    except (ConfigError, ModelError) as exc:
        if isinstance(exc, ConfigError):
            failed = Failed(message=f"Invalid config: {exc}", kind=FailureKind.CONFIG)
        else:
            failed = Failed(message=f"Model problem: {exc}", kind=FailureKind.MODEL)
        return _fail(args, stream, failed, 2)
    except Exception as exc:  # a dataset that cannot be read, a model transformers cannot build
        return _fail(args, stream, Failed(message=f"{type(exc).__name__}: {exc}", detail=repr(exc)), 1)
    stream.write((report.to_json() if args.json else format_report(report)) + "\n")
    return 0


def _fail(args: argparse.Namespace, stream, failed: Failed, code: int) -> int:
    if args.json:
        stream.write(failed.to_json() + "\n")
    print(f"error: {failed.message}", file=sys.stderr)
    return code


def format_report(r: MemoryReport) -> str:
    gib = 1024**3
    lines = [
        f"parameters:  {r.total_params:,} total, {r.trainable_params:,} trainable ({r.params_source})",
        f"lengths:     {r.lengths.description}",
        "components:",
        *(f"  {name:<12} {value / gib:8.3f} GiB" for name, value in r.components.items()),
        f"  {'total':<12} {r.total_bytes / gib:8.3f} GiB",
        f"device:      {r.device_name} ({r.device_kind}), {r.device_bytes / gib:.2f} GiB free",
        *([f"runtime:     {runtime_baseline().description}"] if r.device_kind != "cuda" else []),
        f"verdict:     {r.verdict}: {r.message}",
    ]
    if r.cheapest_change:
        lines.append(f"cheapest change: {r.cheapest_change}")
    lines += [f"note:        {n}" for n in r.notes]
    return "\n".join(lines)
