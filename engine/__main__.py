"""``python -m engine``: the engine's command line.

    python -m engine train CONFIG            one training run; JSON-line events on stdout
    python -m engine train --resume RUN      continue a stopped or interrupted run
    python -m engine export RUN OUT_DIR      write the adapter in PEFT's format
    python -m engine demo                    train on the bundled demo task, print the score before/after
    python -m engine data inspect FILE       detect format, check, preview (see --help)
    python -m engine data convert FILE OUT --to FORMAT
    python -m engine model info MODEL        resolve (and convert a GGUF) a model; prints a 'model' event
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "data":
        from engine.data_cli import main as data_main

        return data_main(rest)
    from engine.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
