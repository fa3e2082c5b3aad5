"""The engine's subcommands: train, export, demo, model info, serve.

Events go to stdout as JSON lines and nothing else does: file descriptor 1 is pointed at stderr for the
life of the process, so a library that prints cannot corrupt the event stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from finetune_studio.core import events as ev
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.engine import logs


def _event_stream():
    """A private copy of stdout for events; fd 1 (print, C libraries) now goes to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", buffering=1, encoding="utf-8")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Library notices and deprecations are for developers: they go to the run's engine.log, not the run log.
    logs.setup()


def cmd_train(args: argparse.Namespace, stream) -> int:
    from finetune_studio.engine.reporting import Reporter

    reporter = Reporter(stream=stream)
    try:
        if args.resume:
            config = None
        else:
            if not args.config:
                raise ConfigError("config", "give a config file (YAML or JSON), or --resume RUN")
            config = TrainConfig.load(args.config)
            if args.set:
                config = TrainConfig.from_dict({**config.to_dict(), **_parse_sets(args.set)})
    except ConfigError as exc:
        reporter.emit(ev.Failed(message=f"Invalid config: {exc}", kind="config"))
        return 2

    from finetune_studio.engine.train import StopFlag, TrainingFailed, train_run

    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the app closed; the run goes on
    try:
        train_run(config, resume=args.resume, reporter=reporter, stop=stop)
    except TrainingFailed:
        return 1
    except ConfigError as exc:  # resume of an unknown / finished run: no run row to mark
        reporter.emit(ev.Failed(message=f"Invalid request: {exc}", kind="config"))
        return 2
    return 0


def _parse_sets(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "--set takes KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_export(args: argparse.Namespace, stream) -> int:
    from finetune_studio.engine.export import ExportError, export_adapter

    try:
        out = export_adapter(args.run, args.out_dir, overwrite=args.force)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Adapter written to {out}", file=sys.stderr)
    stream.write(ev.Log(level="info", message=f"exported to {out}").to_json() + "\n")
    return 0


def cmd_model_info(args: argparse.Namespace, stream) -> int:
    from finetune_studio.engine.models import LoadOptions, ModelError, describe, resolve_model

    def progress(stage: str, done: int, total: int, message: str) -> None:
        stream.write(ev.Progress(stage=stage, done=done, total=total, message=message).to_json() + "\n")
        stream.flush()

    try:
        folder = resolve_model(args.model, LoadOptions(allow_pickle=args.allow_pickle), progress=progress)
        info = describe(folder, name="SmolLM2-135M-Instruct (bundled)" if args.model == "default" else "")
    except ModelError as exc:
        stream.write(ev.Failed(message=f"Model problem: {exc}", kind="model").to_json() + "\n")
        return 1
    stream.write(info.to_json() + "\n")
    return 0


def cmd_demo(rest: list[str]) -> int:
    from finetune_studio.engine.demo import main as demo_main

    return demo_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_studio.engine", description="Finetune Studio's training engine."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run one training run (JSON-line events on stdout)")
    p.add_argument("config", nargs="?", help="YAML or JSON config file")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped or interrupted run (id or folder)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p = sub.add_parser("export", help="write a run's adapter in PEFT's format")
    p.add_argument("run", help="run id (or unique prefix) or run folder")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p = sub.add_parser("model", help="model commands")
    msub = p.add_subparsers(dest="model_command", required=True)
    mi = msub.add_parser("info", help="resolve (convert a GGUF once) and describe a model")
    mi.add_argument("model")
    mi.add_argument("--allow-pickle", action="store_true")
    sub.add_parser("demo", help="train on the bundled demo task and print the score before and after", add_help=False)
    p = sub.add_parser("serve", help="the generation worker: JSON-line requests on stdin, replies on stdout")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: half the cores, 1 to 8)")
    return parser


def main(argv: list[str]) -> int:
    if argv and argv[0] == "demo":
        _quiet_libraries()
        return cmd_demo(argv[1:])
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    stream = _event_stream()
    try:
        if args.command == "train":
            return cmd_train(args, stream)
        if args.command == "export":
            return cmd_export(args, stream)
        if args.command == "serve":
            from finetune_studio.engine.serve import main as serve_main

            return serve_main(args.threads, stream)
        return cmd_model_info(args, stream)
    except Exception as exc:
        logging.getLogger("finetune_studio.engine").exception("unexpected error")
        stream.write(
            ev.Failed(
                message=f"Unexpected error: {type(exc).__name__}: {exc}", kind="error", detail=repr(exc)
            ).to_json()
            + "\n"
        )
        return 1
    finally:
        try:
            stream.flush()
        except OSError:
            pass
