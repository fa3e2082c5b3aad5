"""``python -m studio`` / ``finetune-studio``: open Finetune Studio."""

from __future__ import annotations

import sys


def main() -> int:
    from studio.app import run

    return run(sys.argv)


if __name__ == "__main__":
    sys.exit(main())
