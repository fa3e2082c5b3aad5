"""The ``sbatch`` script that runs a config across machines: one torchrun agent per node, a c10d rendezvous.

Each node runs ``train CONFIG --nproc G --nnodes N --rdzv-endpoint <first node>:PORT``; the agents meet on the
job's first node. The run folder (``FINETUNE_STUDIO_HOME``) must be on a file system every node sees: rank 0
writes the run's rows and events there, and every rank its checkpoint part. Pure Python: the engine's
``slurm`` command prints it, the studio's runs page saves it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


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
