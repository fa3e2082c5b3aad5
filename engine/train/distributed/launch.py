"""``train CONFIG --nproc N``: start the run as N ranks through torchrun (``torch.distributed.run``, in process).

This process is torchrun's agent: it starts the ranks as ``python -P -m finetune_studio.engine train ...
--rank-worker``, forwards SIGTERM / SIGINT to every rank (they agree on a step, checkpoint and stop), and when a
rank dies or fails it stops the others (SIGTERM, then SIGKILL after ``--shutdown-timeout``). It then emits one
``failed`` event naming the rank and the cause, and marks the run failed (resumable from its last checkpoint).
Rank 0 writes the events on this process's stdout, which the ranks inherit; this process writes nothing else there.

Across machines, run the same command on every node with ``--nnodes``, ``--node-rank`` (or a c10d rendezvous
through ``--rdzv-endpoint``); only the node that holds rank 0 speaks, and the run folder must be shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.protocol import events as ev

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30  # SIGTERM -> SIGKILL grace for ranks that do not stop (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)


def shutdown_timeout() -> int:
    return int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or SHUTDOWN_TIMEOUT_S)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--nproc", type=int, metavar="N", help="processes on this machine (one per GPU; gloo on the CPU)")
    g.add_argument("--nnodes", default="1", help="machines taking part (torchrun's --nnodes)")
    g.add_argument("--node-rank", type=int, default=None, help="this machine's index with a static rendezvous")
    g.add_argument("--master-addr", default=None, help="rank 0's host with a static rendezvous")
    g.add_argument("--master-port", type=int, default=None, help="rank 0's port with a static rendezvous")
    g.add_argument("--rdzv-endpoint", default="", help="host:port of the c10d rendezvous (several machines)")
    g.add_argument("--rdzv-id", default="", help="a job id shared by every machine (c10d rendezvous)")
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a collective may wait for a hung rank before the run fails (default 600)",
    )
    g.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The engine command every rank runs."""
    out = ["-P", "-u", "-m", "finetune_studio.engine", "train"]
    if args.config:
        out.append(str(Path(args.config).resolve()))
    if args.resume:
        out += ["--resume", args.resume]
    for item in args.set or []:
        out += ["--set", item]
    if args.dist_timeout:
        out += ["--dist-timeout", str(args.dist_timeout)]
    return [*out, "--rank-worker"]


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """torchrun's own arguments, then the worker command (``--no-python``: the interpreter is named)."""
    out = ["--nproc-per-node", str(args.nproc), "--nnodes", str(args.nnodes), "--max-restarts", "0"]
    out += ["--monitor-interval", "0.2", "--signals-to-handle", "SIGTERM,SIGINT"]
    out += ["--shutdown-timeout", str(shutdown_timeout())]
    if args.rdzv_endpoint:
        out += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
        out += ["--rdzv-id", args.rdzv_id or "finetune-studio"]
    elif args.node_rank is not None or args.master_addr:
        out += ["--node-rank", str(args.node_rank or 0)]
        out += ["--master-addr", args.master_addr or "127.0.0.1", "--master-port", str(args.master_port or 29500)]
    elif str(args.nnodes) == "1":
        out += ["--standalone"]
    return [*out, "--no-python", sys.executable, *worker_argv(args)]


def validate(args: argparse.Namespace) -> TrainConfig | None:
    """The checks worth making before N processes load a model: the config, the world size, a resumable run."""
    if args.nproc < 1:
        raise ConfigError("nproc", f"must be at least 1, not {args.nproc}")
    if args.resume:
        from finetune_studio.core.store import Store

        store = Store()
        try:
            run = store.find_run(args.resume)
        finally:
            store.close()
        if run is None:
            raise ConfigError(
                "resume", f"no run named {args.resume!r}; give a run id from the runs list or a run folder"
            )
        if run["status"] == "completed":
            raise ConfigError("resume", f"run {run['id']} already completed; start a new run from its config")
        if run["status"] == "running":
            raise ConfigError("resume", f"run {run['id']} is still running (process {run['pid']})")
        config = TrainConfig.from_dict(json.loads(run["config"]))
    else:
        if not args.config:
            raise ConfigError("config", "give a config file (YAML or JSON), or --resume RUN")
        config = TrainConfig.load(args.config)
        if args.set:
            config = config.with_overrides(args.set)
    nnodes = int(str(args.nnodes).split(":")[-1])
    world = args.nproc * nnodes
    per_step = config.batch_size * config.gradient_accumulation_steps
    if per_step % world:
        raise ConfigError(
            "batch_size",
            f"the global batch (batch_size x gradient_accumulation_steps = {per_step}) must split evenly over "
            f"{world} processes: choose a multiple of {world}",
        )
    return config


def launch(args: argparse.Namespace) -> int:
    """Run torchrun's agent here; returns the exit code (0 completed or stopped, 1 failed, 2 invalid request)."""
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")  # fd 1 itself stays for the ranks
    sys.stdout = sys.stderr
    try:
        validate(args)
    except ConfigError as exc:
        _write(events, ev.Failed(message=f"Invalid config: {exc}", kind=ev.FailureKind.CONFIG))
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from finetune_studio.engine.train.distributed import ranks as distributed

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the app closed; the run goes on (the ranks inherit this)
    fd, launch_file = tempfile.mkstemp(prefix="finetune-launch-", suffix=".json")
    os.close(fd)
    os.unlink(launch_file)
    os.environ.update(
        {
            distributed.LAUNCH_FILE_ENV: launch_file,
            distributed.LAUNCHER_PID_ENV: str(os.getpid()),
            distributed.WORKER_ENV: "1",
        }
    )
    try:
        run(parse_args(torchrun_argv(args)))
        return 0
    except ChildFailedError as exc:
        rank0_spoke = any(r == 0 and f.exitcode == 2 and f.error_file == "<N/A>" for r, f in exc.failures.items())
        if rank0_spoke and not Path(launch_file).is_file():
            return 2  # rank 0 refused the request (config, resume) and said so
        kind, message, detail = describe_failure(exc.failures, args.nproc * int(str(args.nnodes).split(":")[-1]))
        _fail_run(events, launch_file, kind, message, detail)
        return 1
    except SignalException as exc:  # the ranks were told to stop; they checkpointed unless they were killed
        return _after_stop(events, launch_file, exc)
    except Exception as exc:  # torchrun's agent itself failed (rendezvous, a port, the store): say so, never exit mute
        log.exception("the torchrun agent failed")
        message = f"The launcher of {args.nproc} processes failed: {type(exc).__name__}: {exc}"
        _fail_run(events, launch_file, "error", message, traceback.format_exc(limit=5))
        return 1
    finally:
        Path(launch_file).unlink(missing_ok=True)
        try:
            events.flush()
        except OSError:
            pass


def describe_failure(failures: dict, world_size: int) -> tuple[str, str, str]:
    """(kind, message, detail) naming the rank whose failure came first for a reason of its own.

    A rank whose collective broke because another died (``peer``) is a consequence; a rank that raised (OOM, bad
    data) or died (signal, exit code) is a cause. Among causes, the earliest.
    """
    from finetune_studio.engine.train.distributed.ranks import RankFailure

    def info(rank, f):
        rf = RankFailure.from_text(f.message) if isinstance(f.message, str) else None
        order = 0 if rf is not None and not rf.peer else 1 if rf is None else 2
        return order, f.timestamp, rank, f, rf

    infos = [info(r, f) for r, f in failures.items()]
    parsed = [i[4] for i in infos]
    _order, _ts, rank, f, rf = min(infos, key=lambda t: t[:3])
    if rf is not None:
        cause = rf.message
        kind = rf.kind
    elif f.exitcode < 0:
        cause = f"the process (pid {f.pid}) was killed by signal {f.signal_name()}"
        kind = "error"
        waited = [g for g in parsed if g is not None and g.peer and "timed out" in g.detail.lower()]
        if waited:  # the others gave up waiting for it, then torchrun had to kill it: it hung
            cause = (
                f"it stopped responding (rank {waited[0].rank} timed out waiting for it) and was killed "
                f"(pid {f.pid}, {f.signal_name()})"
            )
    else:
        cause = f"the process (pid {f.pid}) exited with code {f.exitcode}"
        kind = "error"
    others = ", ".join(
        f"rank {r}: {'signal ' + g.signal_name() if g.exitcode < 0 else 'exit ' + str(g.exitcode)}"
        for r, g in sorted(failures.items())
        if r != rank
    )
    message = f"Rank {rank} of {world_size} failed: {cause}"
    detail = "; ".join(x for x in (rf.detail if rf is not None else "", f"also ended: {others}" if others else "") if x)
    return kind, message, detail


def _run_of(launch_file: str) -> dict:
    try:
        return json.loads(Path(launch_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fail_run(events, launch_file: str, kind: str, message: str, detail: str) -> None:
    from finetune_studio.core.store import Store
    from finetune_studio.engine import checkpoint

    run = _run_of(launch_file)
    run_id = run.get("run_id", "")
    if run_id:
        latest = checkpoint.latest_checkpoint(Path(run["run_dir"]))
        message += (
            f". Resume the run from {latest.name}." if latest else ". No checkpoint yet: resume starts at step 0."
        )
        store = Store()
        try:
            store.update_run(run_id, status="failed", error=message, error_kind=kind, finished_at=time.time())
        finally:
            store.close()
        failed = ev.Failed(message=message, kind=ev.FailureKind.parse(kind), run_id=run_id, detail=detail)
        _append_event_file(Path(run["run_dir"]), failed)
    _write(events, ev.Failed(message=message, kind=ev.FailureKind.parse(kind), run_id=run_id, detail=detail))


def _after_stop(events, launch_file: str, exc) -> int:
    from finetune_studio.core.store import Store

    run = _run_of(launch_file)
    if not run:
        return 0  # stopped before any run existed
    store = Store()
    try:
        recorded = store.get_run(run["run_id"])
        status = recorded.status if recorded else None
    finally:
        store.close()
    if status in ("stopped", "completed"):
        return 0
    message = f"Stopped by {exc}, but the ranks did not checkpoint within {shutdown_timeout()} s and were killed"
    _fail_run(events, launch_file, "error", message, "")
    return 1


def _append_event_file(run_dir: Path, event: ev.Event) -> None:
    try:
        with open(run_dir / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(event.to_json() + "\n")
    except OSError:
        pass


def _write(events, event: ev.Event) -> None:
    try:
        events.write(event.to_json() + "\n")
        events.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass
