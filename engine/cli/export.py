"""``python -m finetune_studio.engine export``: write a run's export, check it, print the verdict.

Progress and the result go to stdout as typed events (``Progress``, then ``ExportResult`` or ``Failed``);
the verdict is also printed to stderr for a person at a terminal. Exit status: 0 written and passed,
3 written but the check failed (files kept, marked failed), 1 nothing written (the message says why),
130 cancelled (SIGTERM or Ctrl-C; nothing left behind).
"""

from __future__ import annotations

import argparse
import signal
import sys

from finetune_studio.core.protocol import events as ev
from finetune_studio.core.store import DatabaseDamaged

EXIT_CHECK_FAILED = 3
EXIT_CANCELLED = 130


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's adapter (and merged / GGUF / Ollama forms), then check it")
    p.add_argument("run", help="run id (or unique prefix) or run folder")
    p.add_argument("out_dir", nargs="?", help="folder to write (default: exports/<run>-<checkpoint> in the data dir)")
    p.add_argument(
        "--format",
        action="append",
        default=[],
        metavar="adapter|merged|gguf|ollama",
        help="forms to write (repeat or comma-separate); the adapter is always written",
    )
    p.add_argument("--checkpoint", metavar="N|best", help="a checkpoint's step, or best (lowest eval loss)")
    p.add_argument(
        "--quant", default="q8_0", help="GGUF types, comma-separated: f32, f16, q8_0, q5_0, q5_1, q4_0, q4_1"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "float32", "bfloat16"),
        help="merged weights: auto (float16 where it keeps the training update, float32 otherwise); a 16-bit dtype "
        "that would round the update away is refused",
    )
    p.add_argument("--force", action="store_true", help="replace a previous export in that folder")
    p.add_argument("--no-check", action="store_true", help="skip the reload check (the export is marked unchecked)")


def run(args: argparse.Namespace, stream) -> int:
    from finetune_studio.engine.export.errors import ExportCancelled, ExportError
    from finetune_studio.engine.export.writer import ExportRequest, export

    cancelled = []
    signal.signal(signal.SIGTERM, lambda *_: cancelled.append(True))
    signal.signal(signal.SIGINT, lambda *_: cancelled.append(True))

    def emit(event) -> None:
        stream.write(event.to_json() + "\n")
        stream.flush()

    def progress(stage: str, done: int, total: int, message: str) -> None:
        print(f"[{done}/{total}] {message}", file=sys.stderr)
        emit(ev.Progress(stage=stage, done=done, total=total, message=message))

    request = ExportRequest(
        run=args.run,
        out=args.out_dir,
        formats=tuple(args.format) or ("adapter",),
        quants=(args.quant,),
        checkpoint=args.checkpoint,
        force=args.force,
        dtype=args.dtype,
        check=not args.no_check,
    )
    try:
        outcome = export(request, progress=progress, cancel=lambda: bool(cancelled))
    except ExportCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        emit(ev.Failed(message=str(exc), kind=ev.FailureKind.CANCELLED))
        return EXIT_CANCELLED
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        emit(ev.Failed(message=f"Export not written: {exc}", kind=ev.FailureKind.CONFIG))
        return 1
    except DatabaseDamaged as exc:  # the run cannot be looked up: the message names the file and `db recover`
        print(f"error: {exc}", file=sys.stderr)
        emit(ev.Failed(message=f"Database problem: {exc}", kind=ev.FailureKind.DATABASE))
        return 1
    report = outcome.report
    verdict = report.get("verdict") or "written, not checked (--no-check)"
    answer = (report.get("reference") or {}).get("answer", "")
    print(f"Export written to {outcome.path}", file=sys.stderr)
    print(f"Check: {verdict}", file=sys.stderr)
    if answer:
        print(f"Sample answer: {answer!r}", file=sys.stderr)
    emit(
        ev.ExportResult(
            run_id=outcome.source.run_id,
            path=str(outcome.path),
            passed=bool(report.get("passed")),
            verdict=verdict,
            checkpoint=outcome.source.label,
            formats=_labels(outcome),
            sample=answer,
            report_file=str(outcome.path / "check.json"),
        )
    )
    if report.get("checked") and not report.get("passed"):
        return EXIT_CHECK_FAILED
    return 0


def _labels(outcome) -> list[str]:
    forms = (outcome.report or {}).get("forms") or []
    labels = [f["label"] for f in forms] if forms else list(outcome.formats)
    if "ollama" in outcome.formats and "ollama" not in labels:
        labels.append("ollama")
    return labels
