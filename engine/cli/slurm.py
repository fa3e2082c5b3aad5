"""``slurm CONFIG --nodes N --gpus-per-node G``: print an ``sbatch`` script that runs the config across machines.

Each node runs one torchrun agent (``train --nproc G --nnodes N --rdzv-endpoint <first node>:29500``); the
agents meet in a c10d rendezvous on the job's first node. The run folder (``FINETUNE_STUDIO_HOME``) must be on
a file system every node sees: rank 0 writes the run's rows and events there, and every rank its checkpoint part.
"""

from __future__ import annotations

import argparse
import sys

from finetune_studio.core.slurm import sbatch_script


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
