"""The ``sbatch`` script that runs a config across machines: one torchrun agent per node, a c10d rendezvous.

Each node runs ``train CONFIG --nproc G --nnodes N --rdzv-endpoint <first node>:PORT``; the agents meet on the
job's first node. The run folder (``FINETUNE_STUDIO_HOME``) must be on a file system every node sees: rank 0
writes the run's rows and events there, and every rank its checkpoint part. Pure Python: the engine's
``slurm`` command prints it, the studio's runs page saves it.
"""

from __future__ import annotations

import re
import shlex
import sys
import unicodedata
from pathlib import Path

from finetune_studio.core.config import ConfigError

# What a partition list or a time limit may hold (e.g. ``gpu,debug``, ``1-12:00:00``, ``UNLIMITED``): a space or a
# quote would make sbatch read the rest of the ``#SBATCH`` line as another option.
_PLAIN = re.compile(r"[A-Za-z0-9_.,:+@=/-]+")


def _one_line(what: str, value: str) -> str:
    """``value`` unchanged, or ConfigError when it holds a line break or another control character: written into
    the script it would end the line, and SLURM or bash would read the rest as more of the script."""
    for c in value:
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            kind = "a line break" if c in "\n\r\x0b\x0c\x85\u2028\u2029" else f"the control character {c!r}"
            raise ConfigError(
                what,
                f"{value!r} holds {kind} (a line break or control character would become a line "
                "of its own in the sbatch script); give it on one line, without control characters",
            )
    return value


def _plain(what: str, value: str, example: str) -> str:
    _one_line(what, value)
    if not _PLAIN.fullmatch(value):
        raise ConfigError(what, f"{value!r} is not a plain SLURM value (no spaces or quotes), e.g. {example}")
    return value


def _job_name_option(name: str) -> str:
    """``--job-name=NAME``, double-quoted when the name holds spaces (sbatch reads quotes in ``#SBATCH`` lines)."""
    _one_line("job name", name)
    if not name or '"' in name or "\\" in name:
        raise ConfigError("job name", f"{name!r}: give a name without double quotes or backslashes")
    return f"--job-name={name}" if _PLAIN.fullmatch(name) else f'--job-name="{name}"'


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
    """The script's text. ConfigError (a ValueError) naming the option for a value that cannot be written as one
    value: a line break or control character anywhere, a space or quote in the time or partition."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    if not 1 <= port <= 65535:
        raise ConfigError("port", f"{port} is no TCP port; give one from 1 to 65535 (default 29500)")
    name_option = _job_name_option(job_name)
    _plain("time", time, "24:00:00 or 2-00:00:00")
    if partition:
        _plain("partition", partition, "gpu or gpu,debug")
    _one_line("home", home)
    _one_line("config", str(config))
    lines = [
        "#!/bin/bash",
        f"#SBATCH {name_option}",
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
