"""The engine's subcommands: train, export, demo, methods, model info, serve, estimate, devices, prune, reward.

Events go to stdout as JSON lines and nothing else does: file descriptor 1 is pointed at stderr for the
life of the process, so a library that prints cannot corrupt the event stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.protocol import events as ev
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
    from finetune_studio.engine.train.reporting import Reporter

    reporter = Reporter(stream=stream)
    try:
        if args.resume:
            config = None
        else:
            if not args.config:
                raise ConfigError("config", "give a config file (YAML or JSON), or --resume RUN")
            config = TrainConfig.load(args.config)
            if args.set:
                config = config.with_overrides(args.set)
    except ConfigError as exc:
        reporter.emit(ev.Failed(message=f"Invalid config: {exc}", kind=ev.FailureKind.CONFIG))
        return 2

    from finetune_studio.core.db_recovery import DatabaseDamaged
    from finetune_studio.engine.train.recipe import StopFlag, TrainingFailed, train_run

    ranks = None
    if args.rank_worker:  # one rank of a run started by `train --nproc N` (or by torchrun directly)
        from finetune_studio.engine.train.distributed import ranks as distributed

        ranks = distributed.init(timeout_s=args.dist_timeout or distributed.DEFAULT_TIMEOUT_S)
        if not ranks.is_main:
            reporter.stream = None  # only rank 0 speaks
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the app closed; the run goes on
    try:
        train_run(config, resume=args.resume, reporter=reporter, stop=stop, ranks=ranks)
        if ranks is not None:
            distributed.shutdown()
    except TrainingFailed:
        return 1
    except ConfigError as exc:  # resume of an unknown / finished run: no run row to mark
        reporter.emit(ev.Failed(message=f"Invalid request: {exc}", kind=ev.FailureKind.CONFIG))
        return 2
    except DatabaseDamaged as exc:  # no run row can be written: the event says which file and what to do
        reporter.emit(ev.Failed(message=f"Database problem: {exc}", kind=ev.FailureKind.DATABASE))
        return 1
    return 0


def cmd_export(args: argparse.Namespace, stream) -> int:
    from finetune_studio.engine.cli import export as export_cli

    return export_cli.run(args, stream)


def cmd_model_info(args: argparse.Namespace, stream) -> int:
    from finetune_studio.engine.models import LoadOptions, ModelError, describe, resolve_model

    def progress(stage: str, done: int, total: int, message: str) -> None:
        stream.write(ev.Progress(stage=stage, done=done, total=total, message=message).to_json() + "\n")
        stream.flush()

    try:
        folder = resolve_model(args.model, LoadOptions(allow_pickle=args.allow_pickle), progress=progress)
        info = describe(folder, name="SmolLM2-135M-Instruct (bundled)" if args.model == "default" else "")
        if args.config:
            info = _with_counts(info, folder, TrainConfig.load(args.config))
        elif args.method:
            adapters = dict(method=args.method, lora_rank=args.lora_rank, target_modules=args.target_modules.split(","))
            info = _with_counts(info, folder, TrainConfig(**adapters))
    except ConfigError as exc:
        stream.write(ev.Failed(message=f"Invalid config: {exc}", kind=ev.FailureKind.CONFIG).to_json() + "\n")
        return 2
    except ModelError as exc:
        stream.write(ev.Failed(message=f"Model problem: {exc}", kind=ev.FailureKind.MODEL).to_json() + "\n")
        return 1
    stream.write(info.to_json() + "\n")
    return 0


def _with_counts(info: ev.ModelReady, folder, config: TrainConfig) -> ev.ModelReady:
    """``info`` with total and trainable parameters counted on the meta device for ``config``'s method."""
    import dataclasses

    from finetune_studio.core.memory.estimate import counts_key
    from finetune_studio.engine.train.memory_budget import meta_param_counts

    counts = meta_param_counts(folder, config, config.trust_remote_code)
    return dataclasses.replace(
        info,
        total_params=counts.total_params,
        trainable_params=counts.trainable_params,
        quantizable_params=counts.quantizable_params,
        optimizer_8bit_bytes=counts.optimizer_8bit_bytes,
        counted_for=counts_key(config),
    )


def cmd_demo(rest: list[str]) -> int:
    """``demo [--loop | --rl] ...``: the plain demo (``engine.demo.task``), the SFT -> DPO loop (``engine.demo.loop``)
    or SFT -> GRPO with the task's verifier (``engine.demo.rl``)."""
    if "--rl" in rest:
        from finetune_studio.engine.demo.rl import main as rl_main

        return rl_main([a for a in rest if a != "--rl"])
    if "--distill" in rest:
        from finetune_studio.engine.demo.distill import main as distill_main

        return distill_main([a for a in rest if a != "--distill"])
    if "--loop" in rest:
        from finetune_studio.engine.demo.loop import main as loop_main

        return loop_main([a for a in rest if a != "--loop"])
    from finetune_studio.engine.demo.task import main as demo_main

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
    from finetune_studio.engine.cli import export as export_cli
    from finetune_studio.engine.cli import slurm
    from finetune_studio.engine.train.distributed import launch

    launch.add_arguments(p)
    slurm.add_parser(sub)
    export_cli.add_parser(sub)
    p = sub.add_parser("model", help="model commands")
    msub = p.add_subparsers(dest="model_command", required=True)
    mi = msub.add_parser("info", help="resolve (convert a GGUF once) and describe a model")
    mi.add_argument("model")
    mi.add_argument("--allow-pickle", action="store_true")
    from finetune_studio.engine.cli.estimate import add_parser as add_estimate

    add_estimate(sub)
    from finetune_studio.engine.cli.devices import add_parser as add_devices

    add_devices(sub)
    from finetune_studio.engine.cli.prune import add_parser as add_prune

    add_prune(sub)
    from finetune_studio.engine.cli.reward import add_parser as add_reward

    add_reward(sub)
    mi.add_argument("--config", help="a run config: also count total and trainable parameters for its method")
    mi.add_argument("--method", help="count total and trainable parameters for this method (lora, dora, ...)")
    mi.add_argument("--lora-rank", type=int, default=16, help="with --method: the adapter rank")
    mi.add_argument("--target-modules", default="all-linear", help="with --method: comma-separated targets")
    sub.add_parser("demo", help="train on the bundled demo task and print the score before and after", add_help=False)
    sub.add_parser(
        "methods", help="the PEFT methods lab: each method on one dataset and budget, side by side", add_help=False
    )
    p = sub.add_parser("serve", help="the generation worker: JSON-line requests on stdin, replies on stdout")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: half the cores, 1 to 8)")
    return parser


def main(argv: list[str]) -> int:
    if argv and argv[0] == "demo":
        _quiet_libraries()
        return cmd_demo(argv[1:])
    if argv and argv[0] == "methods":  # the PEFT methods lab (engine.demo.methods_lab)
        _quiet_libraries()
        from finetune_studio.engine.demo.methods_lab import main as methods_main

        return methods_main(argv[1:])
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if args.command == "train" and args.nproc and not args.rank_worker:
        from finetune_studio.engine.train.distributed.launch import launch

        return launch(args)  # torchrun's agent; rank 0 writes the events
    if args.command == "slurm":
        from finetune_studio.engine.cli.slurm import main as slurm_main

        return slurm_main(args)
    stream = _event_stream()
    try:
        if args.command == "train":
            return cmd_train(args, stream)
        if args.command == "export":
            return cmd_export(args, stream)
        if args.command == "serve":
            from finetune_studio.engine.generate.serve import main as serve_main

            return serve_main(args.threads, stream)
        if args.command == "devices":
            from finetune_studio.engine.cli.devices import cmd_devices

            return cmd_devices(args, stream)
        if args.command == "prune":
            from finetune_studio.engine.cli.prune import cmd_prune

            return cmd_prune(args, stream)
        if args.command == "estimate":
            from finetune_studio.engine.cli.estimate import cmd_estimate

            return cmd_estimate(args, stream)
        if args.command == "reward":
            from finetune_studio.engine.cli.reward import cmd_reward

            return cmd_reward(args, stream)
        return cmd_model_info(args, stream)
    except Exception as exc:
        logging.getLogger("finetune_studio.engine").exception("unexpected error")
        stream.write(
            ev.Failed(
                message=f"Unexpected error: {type(exc).__name__}: {exc}", kind=ev.FailureKind.ERROR, detail=repr(exc)
            ).to_json()
            + "\n"
        )
        return 1
    finally:
        try:
            stream.flush()
        except OSError:
            pass
