"""``slurm CONFIG --nodes N --gpus-per-node G``: print an ``sbatch`` script that runs the config across machines.

Each node runs one torchrun agent (``train --nproc G --nnodes N --rdzv-endpoint <first node>:29500``); the
agents meet in a c10d rendezvous on the job's first node. The run folder (``FINETUNE_STUDIO_HOME``) must be on
a file system every node sees: rank 0 writes the run's rows and events there, and every rank its checkpoint part.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("slurm", help="print a SLURM sbatch script that trains CONFIG on several machines")
    p.add_argument("config", help="YAML or JSON config file")
    p.add_argument("--nodes", type=int, default=2, help="machines (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs, hence processes, per machine (default 8)")
    p.add_argument("--job-name", default="finetune-studio")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit")
    p.add_argument("--partition", default="", help="SLURM partition (none: the cluster's default)")
    p.add_argument("--home", default="", help="FINETUNE_STUDIO_HOME on a shared file system")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")


def sbatch_script(
    config: str,
    *,
    nodes: int,
    gpus_per_node: int,
    job_name: str = "finetune-studio",
    time: str = "24:00:00",
    partition: str = "",
    home: str = "",
    port: int = 29500,
    python: str = sys.executable,
) -> str:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1  # one torchrun agent per node; it starts one rank per GPU",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
        "#SBATCH --signal=B:TERM@120  # ask for a checkpoint two minutes before the time limit",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["", "set -euo pipefail"]
    if home:
        lines.append(f"export FINETUNE_STUDIO_HOME={shlex.quote(home)}  # shared by every node")
    lines += [
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "",
        "srun --kill-on-bad-exit=1 "
        + " ".join(
            shlex.quote(a) for a in [python, "-P", "-m", "finetune_studio.engine", "train", str(Path(config).resolve())]
        )
        + f" --nproc {gpus_per_node} --nnodes {nodes}"
        + f' --rdzv-endpoint "$head_node:{port}" --rdzv-id "$SLURM_JOB_ID" &',
        "pid=$!",
        "# SLURM's SIGTERM goes to srun, which forwards it to every node: the ranks checkpoint and stop",
        'trap \'kill -TERM "$pid"; wait "$pid"\' TERM',
        'wait "$pid"',
        "",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        text = sbatch_script(
            args.config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            job_name=args.job_name,
            time=args.time,
            partition=args.partition,
            home=args.home,
            port=args.port,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
