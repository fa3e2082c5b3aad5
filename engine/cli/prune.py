"""``python -m finetune_studio.engine prune``: a smaller student made from a model by dropping decoder layers.

    prune --model M --keep-layers 0,2,4-7 --out FOLDER             keep these layers
    prune --model M --drop N --measure-on DATA --out FOLDER         drop the N layers whose absence changes the
                                                                    outputs least on DATA (greedy, one by one)
    ... [--mlp-width W]                                             also narrow every MLP to W channels
    ... [--json]                                                    one prune_report event instead of the summary

Progress events go to stdout as JSON lines with ``--json``; the folder is an ordinary model folder
(``engine.train.prune``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from finetune_studio.core.config import ConfigError
from finetune_studio.core.protocol.distill_report import PruneReport
from finetune_studio.core.protocol.events import Failed, FailureKind, Progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="make a smaller model by dropping decoder layers (and narrowing the MLP)")
    p.add_argument("--model", required=True, help="the model to prune: 'default', a folder, a .gguf file, a hub id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-layers", metavar="LIST", help="the layers to keep, e.g. 0,1,4-7 (numbered from 0)")
    which.add_argument("--drop", type=int, metavar="N", help="drop N layers, chosen by measuring on --measure-on")
    p.add_argument("--measure-on", metavar="DATASET", help="data to choose layers (and MLP channels) on")
    p.add_argument("--measure", choices=("kl", "hidden"), default="kl", help="the change measured (default: kl)")
    p.add_argument(
        "--search",
        choices=("greedy", "once"),
        default="greedy",
        help="greedy: drop one layer per round, measured anew (default); once: measure each layer alone, drop the N "
        "least missed (faster)",
    )
    p.add_argument("--examples", type=int, default=32, help="rows of the data measured on (default: 32)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per measured row (default: 256)")
    p.add_argument("--mlp-width", type=int, default=0, help="narrow every MLP to this many channels (0: keep)")
    p.add_argument("--out", required=True, help="the new model folder (must not exist)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--json", action="store_true", help="print a prune_report event (JSON line) instead of a summary")


def cmd_prune(args: argparse.Namespace, stream: TextIO) -> int:
    from finetune_studio.engine.models import LoadOptions, ModelError
    from finetune_studio.engine.train.prune import parse_layers, prune

    def progress(stage: str, done: int, total: int, message: str) -> None:
        if args.json:
            stream.write(Progress(stage=stage, done=done, total=total, message=message).to_json() + "\n")
            stream.flush()
        else:
            print(f"  {message}", file=sys.stderr, flush=True)

    try:
        result = prune(
            args.model,
            Path(args.out),
            keep=parse_layers(args.keep_layers) if args.keep_layers else None,
            drop=args.drop or 0,
            measure_on=Path(args.measure_on) if args.measure_on else None,
            measure=args.measure,
            search=args.search,
            mlp_width=args.mlp_width,
            examples=args.examples,
            max_length=args.max_length,
            options=LoadOptions(allow_pickle=args.allow_pickle),
            progress=progress,
        )
    except ConfigError as exc:
        return _fail(args, stream, Failed(message=f"Invalid request: {exc}", kind=FailureKind.CONFIG), 2)
    except ModelError as exc:
        return _fail(args, stream, Failed(message=f"Model problem: {exc}", kind=FailureKind.MODEL), 1)
    report = PruneReport.from_fields({**result.to_dict(), "source": args.model})
    if args.json:
        stream.write(report.to_json() + "\n")
    else:
        stream.write(summary(report) + "\n")
    return 0


def summary(r: PruneReport) -> str:
    kept = ", ".join(map(str, r.kept_layers))
    lines = [
        f"pruned {r.source}: {len(r.kept_layers)} of {r.num_layers_before} layers kept ({kept})",
        f"parameters: {r.params_before:,} -> {r.params_after:,} ({r.params_after / max(r.params_before, 1):.0%})",
    ]
    if r.intermediate_after != r.intermediate_before:
        lines.append(f"MLP width: {r.intermediate_before} -> {r.intermediate_after}")
    for i, round_ in enumerate(r.rounds, 1):
        lines.append(f"  round {i}: dropped layer {round_['dropped']} ({r.measure} change {round_['change']:.4g})")
    lines.append(f"saved to {r.out}")
    return "\n".join(lines)


def _fail(args: argparse.Namespace, stream: TextIO, failed: Failed, code: int) -> int:
    if args.json:
        stream.write(failed.to_json() + "\n")
    print(f"error: {failed.message}", file=sys.stderr)
    return code
