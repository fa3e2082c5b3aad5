"""``finetune-engine`` (``python -m finetune_studio.engine``): the engine's command line.

python -m finetune_studio.engine train CONFIG            one training run; JSON-line events on stdout
python -m finetune_studio.engine train --resume RUN      continue a stopped or interrupted run
python -m finetune_studio.engine train CONFIG --nproc N  the run as N processes (torchrun; DDP or FSDP2)
python -m finetune_studio.engine slurm CONFIG --nodes N --gpus-per-node G   print a SLURM sbatch script
python -m finetune_studio.engine devices [--json]        the GPUs (and CPU) a run can use, as torch sees them
python -m finetune_studio.engine export RUN OUT_DIR      write the adapter in PEFT's format
python -m finetune_studio.engine demo                    train on the bundled demo task, print the score before/after
python -m finetune_studio.engine data inspect FILE       detect format, check, preview (see --help)
python -m finetune_studio.engine data convert FILE OUT --to FORMAT
python -m finetune_studio.engine db check|recover        say whether the database is damaged; keep it, start afresh
python -m finetune_studio.engine model info MODEL        resolve (and convert a GGUF) a model; prints a 'model' event
python -m finetune_studio.engine serve [--threads N]     the generation worker (JSON-line requests on stdin)
python -m finetune_studio.engine pairs import FILE | export OUT_DIR --format F | stats    the preference store
python -m finetune_studio.engine runs lineage RUN        the runs a run started from (init_adapter)
python -m finetune_studio.engine reward score --model FOLDER --prompt P --candidate A [--input F.jsonl] [--json]
                                                         a reward model's scores of answers
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from finetune_studio.core.paths import drop_checkout_from_path

    drop_checkout_from_path()
    if argv is None and sys.argv[1:2] in (["train"], ["demo"]):
        from finetune_studio.core.process_env import restart_with_engine_environment

        restart_with_engine_environment()  # glibc's malloc settings for training (see core.process_env)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "data":
        from finetune_studio.engine.cli.data import main as data_main

        return data_main(rest)
    if command == "db":
        from finetune_studio.engine.cli.db import main as db_main

        return db_main(rest)
    if command == "pairs":
        from finetune_studio.engine.cli.pairs import main as pairs_main

        return pairs_main(rest)
    if command == "runs":
        from finetune_studio.engine.cli.runs import main as runs_main

        return runs_main(rest)
    from finetune_studio.engine.cli.commands import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
